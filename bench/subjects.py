"""Measure audit by data subject: one person's DSAR report over a large trail.

    .venv/bin/python bench/subjects.py [--records 1000000] [--redis-url URL] [--json]

Writes the trail of bench/audit_query.py (2,000 users, 50,000 recordings, 30 days), in
which each recording belongs to one of 20,000 data subjects and every access under a grant
carries that subject as a keyed HMAC, as jitgate writes it. Then it times
`audit.subjects.report` (what `GET /_jit/api/audit/subjects/{id}` and
`jitgate audit subject` run) for a typical subject and for the one whose recordings were
viewed most. Without --redis-url it runs its own redis-server. It prints figures and
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import audit_query  # bench/audit_query.py: bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.audit import subjects  # noqa: E402
from proxy.audit.store import AuditStore  # noqa: E402

SUBJECTS = 20_000
FORM = subjects.SubjectForm("hash", b"bench-subject-key-0123456789abcdef")


def owner(recording: str) -> str:
    """The data subject a recording is of: recordings of one person share it."""
    return f"person-{int(recording.split('-', 1)[0]) % SUBJECTS:05d}"


async def bench(store: AuditStore, args: argparse.Namespace) -> dict[str, Any]:
    n, batch, runs = args.records, args.batch, args.runs
    counts: Counter[str] = Counter()
    trail = audit_query.Trail(n)
    lines: list[str] = []
    write_s = 0.0
    audit_query.log(f"writing {n:,} records in batches of {batch} ...")
    for rec in trail.records():
        if rec["event"].startswith("access.") and "grant_id" in rec:
            person = owner(rec["recording"])
            rec["subject"] = FORM(person)
            counts[person] += 1
        lines.append(json.dumps(rec, separators=(",", ":")))
        if len(lines) == batch:
            t = time.perf_counter()
            await store.write(lines)
            write_s += time.perf_counter() - t
            lines = []
    if lines:
        t = time.perf_counter()
        await store.write(lines)
        write_s += time.perf_counter() - t
    ranked = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
    cases = {"typical": ranked[len(ranked) // 2], "busiest": ranked[-1]}
    out: dict[str, Any] = {
        "records": n, "subjects": len(counts), "records_with_subject": sum(counts.values()),
        "write_rate": round(n / write_s), "runs": runs, "lookups": {},
    }  # fmt: skip
    for name, (person, expected) in cases.items():
        times, rep = [], None
        for _ in range(runs):
            t = time.perf_counter()
            rep = await subjects.report(store, person, FORM.stored(person))
            times.append((time.perf_counter() - t) * 1000)
        assert rep is not None
        out["lookups"][name] = {
            "subject": person, "records": rep["records"], "expected": expected,
            "views": len(rep["views"]), "median_ms": round(statistics.median(times), 2),
            "min_ms": round(min(times), 2), "max_ms": round(max(times), 2),
        }  # fmt: skip
    return out


def main() -> None:
    args = audit_query.parse_args(__doc__ or "", json_flag=True)
    out = audit_query.run(args, bench)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"records        {out['records']:,} ({out['records_with_subject']:,} name a subject)")
    print(f"subjects       {out['subjects']:,}")
    print(f"write rate     {out['write_rate']:,} records/s")
    for name, r in out["lookups"].items():
        print(
            f"{name:<8} {r['subject']}: {r['records']:,} records, {r['views']:,} views; "
            f"median {r['median_ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f})"
        )
    print(f"({out['runs']} runs each; wall time per report, perf_counter)")


if __name__ == "__main__":
    main()
