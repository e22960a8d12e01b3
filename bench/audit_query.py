"""Measure the Redis audit store: write rate, memory per record, query and trim times.

    .venv/bin/python bench/audit_query.py [--records 1000000] [--redis-url URL]

Generates a realistic trail (2,000 users, 50,000 recordings, 30 days of timestamps, mostly
`access.allow` under grants, with each grant's lifecycle records) and writes it through
`AuditStore.write` in batches. Without --redis-url it starts its own redis-server on a free
port in a temporary directory and stops it at the end; with one, it writes under a fresh
key and deletes that key and its indexes at the end. It prints figures and asserts nothing
about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import itertools
import json
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.audit import query as auditquery  # noqa: E402
from proxy.audit.store import AuditStore, Query  # noqa: E402

T = TypeVar("T")
DAY = 86_400.0
USERS = 2_000
RECORDINGS = 50_000
SPAN_DAYS = 30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def own_redis() -> Iterator[str]:
    """Run a private redis-server for the bench and yield its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing (Debian/Ubuntu: apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="jitgate-bench-redis-"))
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Grant:
    id: str
    user: str
    scope: str
    recording: str | None  # None: a project-wide grant, whose accesses hit any recording
    entitlement: str
    reason: str
    ticket: str


@dataclass
class Trail:
    """Generates the records in time order and counts what the queries will look for."""

    n: int
    seed: int = 1
    end: float = field(default_factory=time.time)
    users: Counter[str] = field(default_factory=Counter)
    recordings: Counter[str] = field(default_factory=Counter)
    grants: Counter[str] = field(default_factory=Counter)

    def records(self) -> Iterator[dict[str, Any]]:
        rnd = random.Random(self.seed)
        start = self.end - SPAN_DAYS * DAY
        # A few heavy users and many light ones, as in a support team.
        user_weights = list(itertools.accumulate(1 / (i + 1) ** 0.8 for i in range(USERS)))
        rec_weights = list(itertools.accumulate(1 / (i + 1) ** 0.5 for i in range(RECORDINGS)))
        stamps = sorted(rnd.uniform(start, self.end) for _ in range(self.n))
        counter = itertools.count(1)
        writer = secrets.token_hex(6)
        prev = "0" * 64
        pending: list[Grant] = []
        active: list[Grant] = []
        out = 0

        def user() -> str:
            return f"user-{bisect.bisect(user_weights, rnd.random() * user_weights[-1]):04d}"

        def recording() -> str:
            i = bisect.bisect(rec_weights, rnd.random() * rec_weights[-1])
            return f"{i:05d}-{hashlib.blake2s(str(i).encode(), digest_size=6).hexdigest()}"

        def base(event: str, ts: float) -> dict[str, Any]:
            nonlocal prev
            seq = next(counter)
            mac = hashlib.sha256(f"{writer}{seq}".encode()).hexdigest()
            rec: dict[str, Any] = {
                "id": f"{writer}{seq:012x}",
                "time": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"),
                "ts": round(ts, 3),
                "event": event,
                "writer": writer, "seq": seq, "prev": prev, "kid": "k1", "mac": mac,
            }  # fmt: skip
            prev = mac
            return rec

        def lifecycle(event: str, ts: float, g: Grant, **extra: Any) -> dict[str, Any]:
            rec = base(event, ts)
            rec.update(
                user=g.user, scope=g.scope, grant_id=g.id, reason=g.reason, ticket=g.ticket,
                entitlement=g.entitlement, policy_version="3f2a9c1d0b7e4a55", **extra,
            )  # fmt: skip
            return rec

        while out < self.n:
            ts = stamps[out]
            roll = rnd.random()
            batch: list[dict[str, Any]]
            if roll < 0.015 or not (active or pending):
                rid = recording()
                wide = rnd.random() < 0.2
                g = Grant(
                    id=f"g-{secrets.token_hex(8)}",
                    user=user(),
                    scope="project:1" if wide else f"recording:1/{rid}",
                    recording=None if wide else rid,
                    entitlement="support" if not wide else "security",
                    reason=rnd.choice(("customer ticket", "bug repro", "incident review")),
                    ticket=f"SUP-{rnd.randrange(100_000)}",
                )
                pending.append(g)
                batch = [lifecycle("grant.requested", ts, g, actor=g.user, state="pending")]
            elif (roll < 0.03 or not active) and pending:
                g = pending.pop(0)
                approver = user()
                batch = [
                    lifecycle("grant.approved", ts, g, actor=approver, approvers=[approver],
                              comment="ok", state="active", expires_at=round(ts + 3600, 3)),
                    lifecycle("grant.activated", ts, g, state="active",
                              expires_at=round(ts + 3600, 3)),
                ]  # fmt: skip
                active.append(g)
                if len(active) > 300:
                    old = active.pop(0)
                    batch.append(lifecycle("grant.expired", ts, old, state="expired"))
            else:
                if rnd.random() < 0.03:  # refused: no grant
                    g, allow = None, False
                    who, rid, scope = user(), recording(), None
                else:
                    g = rnd.choice(active)
                    allow = rnd.random() < 0.97
                    who, rid, scope = g.user, g.recording or recording(), g.scope
                rec = base("access.allow" if allow else "access.deny", ts)
                snapshots = rnd.random() < 0.7
                path = f"/api/projects/1/session_recordings/{rid}" + (
                    "/snapshots" if snapshots else ""
                )
                rec.update(
                    user=who, scope=scope or f"recording:1/{rid}", recording=rid,
                    decision="allow" if allow else "deny",
                    reasons=[f"grant {g.id} active" if g and allow else "no active grant"],
                    route="recording_snapshots" if snapshots else "recording",
                    method="GET", path=path, status=200 if allow else 403,
                    bytes=rnd.randrange(2_000, 400_000) if allow else 180,
                    duration_ms=round(rnd.uniform(1, 40), 3),
                    client_ip=f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}",
                    user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
                    policy_version="3f2a9c1d0b7e4a55",
                )  # fmt: skip
                if g is not None:
                    rec["grant_id"] = g.id
                batch = [rec]
            for rec in batch[: self.n - out]:
                self.users[rec["user"]] += 1
                if "recording" in rec:
                    self.recordings[rec["recording"]] += 1
                if "grant_id" in rec:
                    self.grants[rec["grant_id"]] += 1
                out += 1
                yield rec


async def timed(runs: int, call: Callable[[], Awaitable[Any]]) -> tuple[list[float], Any]:
    """Return the times of `runs` calls in ms and the last result."""
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = await call()
        times.append((time.perf_counter() - t) * 1000)
    return times, result


def parse_args(doc: str, json_flag: bool = False) -> argparse.Namespace:
    """Read the options the audit benches share: --records, --redis-url, --batch, --runs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--batch", type=int, default=1000, help="records per write")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per query")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.records < 1 or args.batch < 1 or args.runs < 1:
        parser.error("--records, --batch and --runs must be at least 1")
    return args


def run(
    args: argparse.Namespace, bench: Callable[[AuditStore, argparse.Namespace], Awaitable[T]]
) -> T:
    """Run a bench on a fresh audit store: in its own redis-server, or under a fresh key of
    --redis-url's Redis, which is deleted with its indexes at the end."""

    async def on(url: str, own: bool) -> T:
        client = Redis.from_url(url)
        key = "jit:audit" if own else f"jitbench:{secrets.token_hex(4)}:audit"
        try:
            await client.ping()
            return await bench(AuditStore(client, key, maxlen=None), args)
        finally:
            if not own:
                async for name in client.scan_iter(match=f"{key}*", count=1000):
                    await client.unlink(name)
            await client.aclose()

    if args.redis_url:
        return asyncio.run(on(args.redis_url, own=False))
    with own_redis() as url:
        return asyncio.run(on(url, own=True))


async def bench(store: AuditStore, args: argparse.Namespace) -> None:
    client, key, n, batch, runs = store.redis, store.key, args.records, args.batch, args.runs
    before = int((await client.info("memory"))["used_memory"])
    trail = Trail(n)
    write_s, line_bytes, lines = 0.0, 0, []
    log(f"writing {n:,} records in batches of {batch} ...")
    for rec in trail.records():
        lines.append(json.dumps(rec, separators=(",", ":")))
        if len(lines) == batch:
            line_bytes += sum(map(len, lines))
            t = time.perf_counter()
            await store.write(lines)
            write_s += time.perf_counter() - t
            lines = []
    if lines:
        line_bytes += sum(map(len, lines))
        t = time.perf_counter()
        await store.write(lines)
        write_s += time.perf_counter() - t
    used = int((await client.info("memory"))["used_memory"]) - before

    rows: list[tuple[str, int, list[float]]] = []
    viewed = trail.recordings.most_common(1)[0][0]
    typical = sorted(trail.recordings.items(), key=lambda kv: (kv[1], kv[0]))
    typical_rec = typical[len(typical) // 2][0]
    heavy_user = trail.users.most_common(1)[0][0]
    big_grant, big_count = trail.grants.most_common(1)[0]
    grants = sorted(trail.grants.items(), key=lambda kv: (kv[1], kv[0]))
    typical_grant, typical_count = grants[len(grants) // 2]
    end = trail.end
    month = Query(user=heavy_user, events=("access.allow",), since=end - 30 * DAY, until=end)
    day_denials = Query(events=("access.deny",), since=end - DAY, until=end)
    hour = Query(since=end - 10 * DAY, until=end - 10 * DAY + 3600)

    async def count(q: Query) -> int:
        return len((await store.query(q)).records)

    async def answered(q: Query) -> int:
        # What GET /_jit/api/audit does: the page, then each grant's reason as `why`.
        page = await store.query(q)
        ids = (str(r["grant_id"]) for r in page.records if "grant_id" in r)
        auditquery.annotate(page.records, await store.grant_reasons(ids))
        return len(page.records)

    async def grant_records(gid: str) -> int:
        s = await store.summary(gid)
        assert s is not None
        return int(s["requests"]["allowed"]) + int(s["requests"]["denied"])

    cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (f"who viewed recording {typical_rec} (typical)",
         lambda: count(Query(recording=typical_rec))),
        (f"who viewed recording {viewed} (most viewed)",
         lambda: count(Query(recording=viewed))),
        (f"what user viewed last month ({heavy_user}, busiest)", lambda: count(month)),
        ("  the same, with each grant's reason (as the API answers)",
         lambda: answered(month)),
        ("  most viewed recording, with reasons (as the API answers)",
         lambda: answered(Query(recording=viewed))),
        (f"grant summary (typical, {typical_count} records)",
         lambda: grant_records(typical_grant)),
        (f"grant summary (largest, {big_count} records)", lambda: grant_records(big_grant)),
        ("time range 1 h, limit 1000", lambda: count(hour)),
        ("access.deny in the last day, limit 1000", lambda: count(day_denials)),
        ("newest 1000, no filter", lambda: count(Query(order="desc"))),
    ]  # fmt: skip
    for label, call in cases:
        times, result = await timed(runs, call)
        rows.append((label, int(result), times))

    trim_to = n - n // 10
    trimmer = AuditStore(client, key, maxlen=trim_to)
    t = time.perf_counter()
    trimmed = await trimmer.maintain()
    trim_s = time.perf_counter() - t
    after_trim = int((await client.info("memory"))["used_memory"]) - before

    print(f"records        {n:,} (average line {line_bytes / n:,.0f} bytes)")
    print(f"write rate     {n / write_s:,.0f} records/s (batches of {batch}, one script each)")
    print(f"memory         {used / n:,.0f} bytes/record (used_memory +{used / 2**20:,.0f} MiB)")
    print(
        f"trim           {trimmed:,} oldest records in {trim_s:.2f} s "
        f"({trimmed / max(trim_s, 1e-9):,.0f} records/s); then {after_trim / 2**20:,.0f} MiB"
    )
    print()
    width = max(len(label) for label, _, _ in rows)
    print(f"{'query':<{width}}  {'records':>8}  {'median':>10}  {'min':>10}  {'max':>10}")
    for label, result, times in rows:
        print(
            f"{label:<{width}}  {result:>8,}  {statistics.median(times):>7.2f} ms"
            f"  {min(times):>7.2f} ms  {max(times):>7.2f} ms"
        )
    print(f"({runs} runs each; median, min and max wall time per call, perf_counter)")


def main() -> None:
    run(parse_args(__doc__), bench)


if __name__ == "__main__":
    main()
