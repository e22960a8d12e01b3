"""Load-test jitgate with one worker and with several, side by side.

    make bench                      # or: .venv/bin/python bench/workers.py --rounds 3

The same full-enforcement jitgate as bench/run.py's (c) (an RS256 token checked against
the issuer's JWKS, the policy, a grant check, metrics, an audit record per request to the
Redis stream and the file with the HMAC chain), run twice from one config: `jitgate serve
--workers 1` and `jitgate serve --workers N` (2 by default), in front of the same upstream
and Redis. The load generator runs on the same cores as everything else; rounds alternate
between the two and medians are shown. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import run  # bench/run.py: bench/ is the script's directory

WANT = 1.4  # the 2-worker target on a 2-core box, load generator included


def start_jitgate(
    procs: run.Processes, name: str, cfg: Path, workers: int, port: int
) -> run.Server:
    server = procs.start(
        name,
        [*run.jitgate_command(), "serve", "--config", str(cfg), "--workers", str(workers)],
        env=run.jitgate_env(),
    )
    run.wait_http(server, f"http://{run.HOST}:{port}/_jit/healthz")
    if workers > 1:  # the supervisor says so once every worker listens
        deadline = time.monotonic() + 60
        while f"with {workers} workers" not in server.log_file.read_text(errors="replace"):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise run.BenchError(
                    f"{name} did not start its workers:\n{run.tail(server.log_file)}"
                )
            time.sleep(0.05)
    return server


def bench(args: argparse.Namespace, tmp: Path, procs: run.Processes) -> dict[str, Any]:
    loadgen, redis_bin, loadavg = run.start(args, procs)
    up_port, one_port, many_port, redis_port = run.free_ports(4)
    upstream_url = f"http://{run.HOST}:{up_port}"
    run.start_redis(procs, tmp, redis_bin, redis_port)
    www = tmp / "www"
    want = run.write_www(www)
    key = run.make_key(www)
    upstream_kind = run.start_upstream(args.upstream, procs, tmp, www, up_port)
    run.wait_http(procs.servers[-1], f"{upstream_url}/healthz")

    configs = {}
    for name, port in (("one", one_port), ("many", many_port)):
        (tmp / name).mkdir()
        configs[name] = run.write_config(
            tmp / name, port=port, upstream_url=upstream_url, redis_port=redis_port
        )
    one = start_jitgate(procs, "jitgate-1", configs["one"], 1, one_port)
    many = start_jitgate(procs, f"jitgate-{args.workers}", configs["many"], args.workers, many_port)

    seconds = max(3600, math.ceil(4 * args.rounds * (args.warmup + args.duration + 5)))
    grant_id = run.jitgate_cli(
        "grants", "add", "--config", str(configs["one"]), "--user", run.USER,
        "--scope", run.SCOPE, "--ttl", f"{seconds}s", "--reason", "bench",
        "--by", "bench/workers.py",
    )  # fmt: skip
    run.log(f"bench: grant {grant_id} for {run.USER} on {run.SCOPE}")
    headers = {"Authorization": f"Bearer {run.mint(key, seconds)}"}
    targets = [
        run.Target("1", "jitgate, 1 worker", f"http://{run.HOST}:{one_port}{run.PATH}", one),
        run.Target(
            str(args.workers),
            f"jitgate, {args.workers} workers",
            f"http://{run.HOST}:{many_port}{run.PATH}",
            many,
        ),
    ]
    for target in targets:
        run.check_target(target, headers, want)

    for rnd in range(1, args.rounds + 1):
        for target in targets:
            if args.warmup > 0:
                loadgen.run(target.url, headers, args.warmup)
            before = cpu_of_tree(target.front.proc.pid)
            result = loadgen.run(target.url, headers, args.duration)
            after = cpu_of_tree(target.front.proc.pid)
            if target.front.proc.poll() is not None:
                raise run.BenchError(f"{target.label} died:\n{run.tail(target.front.log_file)}")
            target.runs.append(result)
            per_req = (after - before) / result.requests * 1e6 if result.requests else math.nan
            target.cpu_us.append({target.front.name: per_req})
            run.log(
                f"round {rnd}/{args.rounds} {target.label}: {result.rps:.0f} req/s, "
                f"p99 {run._num(result.p99_ms, '.2f')} ms, {result.errors} errors"
            )
            time.sleep(0.5)

    results = {t.key: run.summary(t) for t in targets}
    rps_one, rps_many = results["1"]["rps"], results[str(args.workers)]["rps"]
    return {
        "command": " ".join(sys.orig_argv),
        **run.load_report(args, loadgen, upstream_kind, loadavg),
        "workers": args.workers,
        "results": results,
        "ratio": run.ratio(rps_many, rps_one),
    }


def cpu_of_tree(pid: int) -> float:
    """CPU seconds of a process and its children (a supervisor and its workers)."""
    total = run.cpu_seconds(pid) or 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and "redis" not in stat.split(")")[0]:
                total += run.cpu_seconds(int(entry.name)) or 0.0
    return total


def render(report: dict[str, Any]) -> str:
    lines = [
        "jitgate workers bench",
        f"  command:  {report['command']}",
        f"  code:     {report['code'] or 'unknown'}",
        f"  loadgen:  {report['loadgen']} (on the same cores)",
        f"  upstream: {report['upstream']}",
        f"  load:     {report['duration_s']:g}s per run after {report['warmup_s']:g}s warm-up, "
        f"{report['connections']} connections, {report['rounds']} round(s), alternating",
        f"  machine:  nproc {report['nproc']}, load average at start "
        + " ".join(f"{x:.2f}" for x in report["loadavg_start"]),
        "",
        f"  {'':<26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'cpu us/req':>12}",
    ]
    for res in report["results"].values():
        lines.append(
            f"  {res['label']:<26}{run._num(res['rps'], '.0f'):>9}"
            f"{run._num(res['p50_ms'], '.2f'):>9}{run._num(res['p99_ms'], '.2f'):>9}"
            f"{res['errors']:>8}{run._num(res['cpu_us_per_req'], '.0f'):>12}"
        )
    lines += [
        "",
        f"  {report['workers']} workers / 1 worker req/s: {run._num(report['ratio'], '.2f')} "
        f"(target >= {WANT} for 2 workers on 2 cores)",
        "  cpu us/req: the supervisor and its workers together, per request",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = run.load_parser(__doc__, 3, "alternating rounds; medians shown (3)")
    p.add_argument("--workers", type=int, default=2, help="workers of the second jitgate (2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = run.parse_load(p, argv)
    if args.workers < 2:
        p.error("--workers must be 2 or more")
    report = run.run_bench(lambda tmp, procs: bench(args, tmp, procs), "jitgate-bench-workers-")
    if isinstance(report, int):
        return report
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
