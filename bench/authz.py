"""Forward-auth decisions per second in one jitgate process, with full enforcement.

    make bench                      # or: .venv/bin/python bench/authz.py --rounds 3

jitgate runs as bench/run.py's (c) does (an RS256 token checked against the issuer's JWKS,
the repo's policy, a grant in Redis with the local view, metrics, an audit record per
decision to the Redis stream and the JSON-lines file with the HMAC chain), plus
`forward_auth` and the identity headers it hands back (`forward.user_headers` and a signed
`forward.assertion`). The load generator asks `GET /_jit/authz` as nginx's auth_request
does (X-Original-URI and X-Original-Method) for a path the grant allows, so every answer
is a 200 with the identity headers. It prints decisions/s, latency, jitgate's CPU per
decision, and how many audit records were written for them. It measures; it asserts
nothing about speed. The target: 10,000 decisions/s in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import run  # bench/run.py: processes, config, keys, load generators
from run import HOST, PATH, SCOPE, USER, BenchError, Processes, log

TARGET = 10_000


def count_records(path: Path) -> dict[str, int]:
    """Forward-auth records in the JSON-lines file, by event."""
    counts = {"access.allow": 0, "access.deny": 0}
    if not path.exists():
        return counts
    with path.open("rb") as fh:
        for line in fh:
            if b'"mode":"forward_auth"' in line:
                event = "access.allow" if b'"event":"access.allow"' in line else "access.deny"
                counts[event] += 1
    return counts


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> dict[str, Any]:
    loadgen, redis_bin, loadavg = run.start(args, procs)
    up_port, jit_port, redis_port = run.free_ports(3)
    upstream_url = f"http://{HOST}:{up_port}"
    run.start_redis(procs, tmp, redis_bin, redis_port)
    # The upstream only serves the issuer's JWKS here: forward-auth never forwards.
    www = tmp / "www"
    run.write_www(www)
    key = run.make_key(www)
    upstream_kind = run.start_upstream(args.upstream, procs, tmp, www, up_port)
    upstream = procs.servers[-1]
    run.wait_http(upstream, f"{upstream_url}/healthz")
    cfg = run.write_config(
        tmp, port=jit_port, upstream_url=upstream_url, redis_port=redis_port, audit=args.audit
    )
    with cfg.open("a") as fh:
        fh.write(
            f"forward_auth: {{enabled: true, trusted_proxies: [{HOST}/32]}}\n"
            "forward: {user_headers: true, assertion: true}\n"
        )
    jitgate = procs.start(
        "jitgate", [*run.jitgate_command(), "serve", "--config", str(cfg)], env=run.jitgate_env()
    )
    run.wait_http(jitgate, f"http://{HOST}:{jit_port}/_jit/healthz")
    seconds = max(3600, math.ceil(4 * args.rounds * (args.warmup + args.duration + 5)))
    run.jitgate_cli(
        "grants", "add", "--config", str(cfg), "--user", USER, "--scope", SCOPE,
        "--ttl", f"{seconds}s", "--reason", "bench", "--by", "bench/authz.py",
    )  # fmt: skip
    url = f"http://{HOST}:{jit_port}/_jit/authz"
    headers = {
        "Authorization": f"Bearer {run.mint(key, seconds)}",
        "X-Original-URI": PATH,
        "X-Original-Method": "GET",
    }
    status, _ = run.http_get(url, headers)
    if status != 200:
        raise BenchError(f"GET {url} answered {status}, not 200:\n{run.tail(jitgate.log_file)}")

    runs, cpu, sent = [], [], 1  # the check above was one decision
    for rnd in range(1, args.rounds + 1):
        if args.warmup > 0:
            sent += loadgen.run(url, headers, args.warmup).requests
        before = run.cpu_seconds(jitgate.proc.pid)
        spy = run.profile(procs, jitgate, args.profile, args.duration) if args.profile else None
        result = loadgen.run(url, headers, args.duration)
        if spy is not None:
            spy.wait(timeout=args.duration + 30)
        after = run.cpu_seconds(jitgate.proc.pid)
        if jitgate.proc.poll() is not None:
            raise BenchError(f"jitgate died during the run:\n{run.tail(jitgate.log_file)}")
        sent += result.requests
        runs.append(result)
        if before is not None and after is not None and result.requests:
            cpu.append((after - before) / result.requests * 1e6)
        log(
            f"round {rnd}/{args.rounds}: {result.rps:.0f} decisions/s, "
            f"p50 {run._num(result.p50_ms, '.2f')} ms, p99 {run._num(result.p99_ms, '.2f')} ms, "
            f"{result.errors} errors"
        )
        time.sleep(0.5)

    _, text = run.http_get(f"http://{HOST}:{jit_port}/_jit/metrics")
    checks = {
        m[1].decode(): int(float(m[2]))
        for m in re.finditer(rb'jitgate_grant_checks_total\{answer="(\w+)"\} (\S+)', text)
    }
    # Stopped before counting: on SIGTERM jitgate delivers every queued record first.
    jitgate.proc.terminate()
    jitgate.proc.wait(timeout=30)
    stream = run.redis_command(redis_port, "XLEN", "jit:audit").lstrip(b":").decode()
    rps = run.median([r.rps for r in runs])
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **run.load_report(args, loadgen, upstream_kind, loadavg),
        "audit_sinks": args.audit,
        "decisions_per_s": rps,
        "p50_ms": run.median([r.p50_ms for r in runs]),
        "p99_ms": run.median([r.p99_ms for r in runs]),
        "errors": sum(r.errors for r in runs),
        "decisions": sum(r.requests for r in runs),
        "cpu_us_per_decision": run.median(cpu),
        "per_round": [r.rps for r in runs],
        "target": TARGET,
        "ratio_to_target": rps / TARGET if rps else None,
        "grant_checks": checks,
        "audit": {
            "decisions_sent": sent,
            "records_in_file": count_records(tmp / "audit.jsonl"),
            "stream_length": int(stream) if stream.isdigit() else None,
        },
    }


def render(report: dict[str, Any]) -> str:
    audit = report["audit"]
    records = audit["records_in_file"]
    num = run._num
    return "\n".join(
        [
            "jitgate forward-auth bench",
            f"  date:      {report['date']}   code: {report['code'] or 'unknown'}",
            f"  loadgen:   {report['loadgen']}",
            f"  load:      {report['duration_s']:g}s per round after {report['warmup_s']:g}s "
            f"warm-up, {report['connections']} connections, {report['rounds']} round(s)"
            + ("" if report["audit_sinks"] == "full" else f"; audit: {report['audit_sinks']}"),
            f"  request:   GET /_jit/authz, X-Original-URI: {PATH}, RS256 token via JWKS, "
            "a granted path: each answer a 200 with X-Forwarded-User and a signed assertion",
            f"  machine:   nproc {report['nproc']}, load average at start "
            + " ".join(f"{x:.2f}" for x in report["loadavg_start"]),
            "",
            f"  decisions/s: {num(report['decisions_per_s'], '.0f')} (median; target >= "
            f"{report['target']:,} in one process: x{num(report['ratio_to_target'], '.2f')})",
            f"  latency:     p50 {num(report['p50_ms'], '.2f')} ms, "
            f"p99 {num(report['p99_ms'], '.2f')} ms; errors {report['errors']}",
            f"  jitgate CPU: {num(report['cpu_us_per_decision'], '.0f')} us per decision",
            f"  grants:      {report['grant_checks'].get('view', 0)} checks answered by the local "
            f"view, {report['grant_checks'].get('redis', 0)} by Redis",
            f"  audit:       {records['access.allow']} forward-auth access.allow records in the "
            f"JSON-lines file ({records['access.deny']} deny), Redis stream length "
            f"{audit['stream_length']}, for {audit['decisions_sent']} decisions asked",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = run.load_parser(__doc__, 1, "rounds; the median is shown")
    p.add_argument(
        "--audit",
        choices=tuple(run.AUDIT_SECTIONS),
        default="full",
        help="audit sinks: full (Redis stream and file, as deployed), redis, file, or none "
        "(no record anywhere: only to see what the audit costs)",
    )
    p.add_argument(
        "--profile", type=Path, default=None, help="py-spy jitgate; collapsed stacks to this file"
    )
    args = run.parse_load(p, argv)
    report = run.run_bench(lambda tmp, procs: bench(args, tmp, procs), "jitgate-bench-authz-")
    if isinstance(report, int):
        return report
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
