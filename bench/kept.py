"""What the hot-path work must keep: flat memory on huge bodies, and fast revocation.

    python bench/kept.py [--bytes 1GiB] [--revocations 200] [--cuts 20] [--json]

Starts its own redis-server, the aiohttp bench upstream (bench/upstream.py) and two jitgate
replicas, A and B, sharing that Redis, each with bench/run.py's full configuration
(RS256 via JWKS, audit to the Redis stream and the file with the HMAC chain), then:

1. **Body streaming:** downloads `--bytes` through A under a grant, then uploads as many,
   sampling A's resident memory (VmRSS) every 20 ms; reports the growth over the RSS
   before each transfer.
2. **Revocation across replicas:** `--revocations` times, a fresh grant is used on B until
   B answers from its grant view, then revoked through A's API (as an admin would); B is
   asked again at once until it refuses. Reports the time from sending the revoke to B's
   first refusal, and from A's answer to it.
3. **Live cut:** `--cuts` times, a live stream is opened through B under a grant and
   revoked through A; reports how long until B cuts the stream.

It is a benchmark, not a test: nothing here asserts on the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
from loadgen import percentile

from proxy.grantstore import RedisGrants
from proxy.settings.read import parse_size

RECORDING = "/api/projects/1/session_recordings/demo-{n}"
RESULTS = bench.ROOT / ".jitgate" / "kept-latest.json"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise bench.BenchError(f"no VmRSS for pid {pid}")


class Sampler:
    """Peak VmRSS of one process, sampled every 20 ms in a thread while in the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pid))


async def body_streaming(
    base: str, token: str, size: int, pid: int, session: aiohttp.ClientSession
) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {"bytes": size}
    url = f"{base}{RECORDING.format(n=1)}/big?bytes={size}"
    with Sampler(pid) as down:
        started = time.monotonic()
        got = 0
        async with session.get(url, headers=auth) as resp:
            if resp.status != 200:
                raise bench.BenchError(f"download answered {resp.status}: {await resp.text()}")
            async for chunk in resp.content.iter_any():
                got += len(chunk)
        took = time.monotonic() - started
    if got != size:
        raise bench.BenchError(f"download got {got} of {size} bytes")
    out["download"] = {
        "seconds": round(took, 2),
        "mib_per_s": round(size / took / (1 << 20), 1),
        "rss_before_mib": round(down.before / 1024, 1),
        "rss_growth_mib": round((down.peak - down.before) / 1024, 1),
    }

    async def body() -> AsyncIterator[bytes]:
        left = size
        chunk = b"y" * (1 << 16)
        while left > 0:
            part = chunk if left >= len(chunk) else chunk[:left]
            left -= len(part)
            yield part

    with Sampler(pid) as up:
        started = time.monotonic()
        async with session.post(
            f"{base}{RECORDING.format(n=1)}/upload", headers=auth, data=body()
        ) as resp:
            answer = await resp.json()
        took = time.monotonic() - started
    if answer.get("received") != size:
        raise bench.BenchError(f"upload: the upstream answered {answer}")
    out["upload"] = {
        "seconds": round(took, 2),
        "mib_per_s": round(size / took / (1 << 20), 1),
        "rss_before_mib": round(up.before / 1024, 1),
        "rss_growth_mib": round((up.peak - up.before) / 1024, 1),
    }
    return out


async def revocations(
    a: str, b: str, user_token: str, admin_token: str, grants: RedisGrants, rounds: int,
    session: aiohttp.ClientSession,
) -> dict[str, Any]:  # fmt: skip
    user = {"Authorization": f"Bearer {user_token}"}
    admin = {"Authorization": f"Bearer {admin_token}"}
    url = f"{b}{RECORDING.format(n=2)}/snapshots"
    from_send: list[float] = []
    from_answer: list[float] = []
    for _ in range(rounds):
        grant = await grants.add(bench.USER, "recording:1/demo-2", 600, "bench", "bench")
        # B allows it, and has answered from its view at least once.
        for _ in range(2):
            async with session.get(url, headers=user) as resp:
                if resp.status != 200:
                    raise bench.BenchError(f"B refused a fresh grant: {resp.status}")
                await resp.read()
        sent = time.monotonic()
        async with session.post(f"{a}/_jit/api/grants/{grant.id}/revoke", headers=admin) as r:
            if r.status != 200:
                raise bench.BenchError(f"revoke through A answered {r.status}: {await r.text()}")
            await r.read()
        answered = time.monotonic()
        while True:
            async with session.get(url, headers=user) as resp:
                await resp.read()
                if resp.status == 403:
                    break
                if resp.status != 200:
                    raise bench.BenchError(f"B answered {resp.status} while revoking")
        done = time.monotonic()
        from_send.append(done - sent)
        from_answer.append(done - answered)
    return {
        "rounds": rounds,
        "from_revoke_sent_ms": _stats(from_send),
        "from_revoke_answered_ms": _stats(from_answer),
    }


async def live_cuts(
    a: str, b: str, user_token: str, admin_token: str, grants: RedisGrants, rounds: int,
    session: aiohttp.ClientSession,
) -> dict[str, Any]:  # fmt: skip
    user = {"Authorization": f"Bearer {user_token}"}
    admin = {"Authorization": f"Bearer {admin_token}"}
    took: list[float] = []
    for _ in range(rounds):
        grant = await grants.add(bench.USER, "recording:1/demo-3", 600, "bench", "bench")
        async with session.get(f"{b}{RECORDING.format(n=3)}/live", headers=user) as resp:
            if resp.status != 200:
                raise bench.BenchError(f"live stream refused: {resp.status}")
            await resp.content.readline()
            async with session.post(f"{a}/_jit/api/grants/{grant.id}/revoke", headers=admin) as r:
                await r.read()
            sent = time.monotonic()
            try:
                while await resp.content.readline():
                    pass
            except aiohttp.ClientError:
                pass  # cut: the connection was aborted, as it must be
            took.append(time.monotonic() - sent)
    return {"rounds": rounds, "cut_after_revoke_ms": _stats(took)}


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    assert p50 is not None and p99 is not None  # at least one round: argparse checks it
    return {"p50": round(p50, 2), "p99": round(p99, 2), "max": round(ms[-1], 2)}


def start(args: argparse.Namespace, tmp: Path, procs: bench.Processes) -> dict[str, Any]:
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise bench.BenchError("redis-server is missing (apt-get install redis-server)")
    up_port, a_port, b_port, redis_port = bench.free_ports(4)
    upstream_url = f"http://{bench.HOST}:{up_port}"
    bench.start_redis(procs, tmp, redis_bin, redis_port)
    www = tmp / "www"
    bench.write_www(www)
    key = bench.make_key(www)
    bench.start_upstream("aiohttp", procs, tmp, www, up_port)
    upstream = procs.servers[-1]
    bench.wait_http(upstream, f"{upstream_url}/healthz")
    replicas = {}
    for name, port in (("A", a_port), ("B", b_port)):
        home = tmp / name
        home.mkdir()
        cfg = bench.write_config(home, port=port, upstream_url=upstream_url, redis_port=redis_port)
        # The upload is as large as the download: past listen.max_body_bytes's default.
        listen = f"listen: {{host: {bench.HOST}, port: {port}"
        cap = f", max_body_bytes: {parse_size(args.bytes)}"
        text = cfg.read_text().replace(listen, listen + cap)
        cfg.write_text(text + "admins: {users: [admin]}\n")
        server = procs.start(
            f"jitgate-{name}",
            [*bench.jitgate_command(), "serve", "--config", str(cfg)],
            env=bench.jitgate_env(),
        )
        bench.wait_http(server, f"http://{bench.HOST}:{port}/_jit/healthz")
        replicas[name] = (f"http://{bench.HOST}:{port}", server)
    return {
        "key": key,
        "redis_url": f"redis://{bench.HOST}:{redis_port}/0",
        "replicas": replicas,
    }


async def measure(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    (a, server_a), (b, _) = ctx["replicas"]["A"], ctx["replicas"]["B"]
    user_token = bench.mint(ctx["key"], 3600)
    admin_token = bench.mint(ctx["key"], 3600, sub="admin")
    client = Redis.from_url(ctx["redis_url"])
    grants = RedisGrants(client)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await grants.add(bench.USER, "recording:1/demo-1", 3600, "bench", "bench")
            size = parse_size(args.bytes)
            bench.log(f"kept: streaming {size} bytes down and up through A")
            body = await body_streaming(a, user_token, size, server_a.proc.pid, session)
            bench.log(f"kept: {args.revocations} revocations through A, checked on B")
            revoked = await revocations(
                a, b, user_token, admin_token, grants, args.revocations, session
            )
            bench.log(f"kept: {args.cuts} live streams on B cut by revocations through A")
            cuts = await live_cuts(a, b, user_token, admin_token, grants, args.cuts, session)
    finally:
        await client.aclose()
    return {"body": body, "revocation": revoked, "live_cut": cuts}


def render(report: dict[str, Any]) -> str:
    body, rev, cut = report["body"], report["revocation"], report["live_cut"]
    down, up = body["download"], body["upload"]
    size = body["bytes"] / (1 << 20)
    s1, s2 = rev["from_revoke_sent_ms"], rev["from_revoke_answered_ms"]
    c = cut["cut_after_revoke_ms"]
    return "\n".join(
        [
            "jitgate kept-as-today bench",
            f"  command:   {report['command']}",
            f"  code:      {report['code']}",
            f"  machine:   nproc {os.cpu_count()}, {report['platform']}",
            f"  body:      {size:.0f} MiB through replica A; RSS growth (target <= 32 MB): "
            f"download {down['rss_growth_mib']} MiB ({down['mib_per_s']} MiB/s), "
            f"upload {up['rss_growth_mib']} MiB ({up['mib_per_s']} MiB/s)",
            f"  revoke:    {rev['rounds']} revocations through A until B refuses "
            f"(target p99 <= 100 ms): from the revoke sent p50 {s1['p50']} ms, "
            f"p99 {s1['p99']} ms, max {s1['max']} ms; from A's answer p99 {s2['p99']} ms",
            f"  live cut:  {cut['rounds']} live streams on B cut after a revoke through A "
            f"(target <= 1 s): p50 {c['p50']} ms, max {c['max']} ms",
            f"  results:   {RESULTS.relative_to(bench.ROOT)}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bytes", default="1GiB", help="body size streamed each way (1GiB)")
    p.add_argument("--revocations", type=int, default=200, help="revocations measured (200)")
    p.add_argument("--cuts", type=int, default=20, help="live streams cut (20)")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = p.parse_args(argv)
    if args.revocations < 1 or args.cuts < 1:
        p.error("--revocations and --cuts must be positive")
    tmp = Path(tempfile.mkdtemp(prefix="jitgate-kept-"))
    (tmp / "logs").mkdir()
    procs = bench.Processes(tmp / "logs")
    try:
        ctx = start(args, tmp, procs)
        report = {
            "command": " ".join(sys.orig_argv),
            "code": bench.code_revision(),
            "platform": platform.platform(),
            **asyncio.run(measure(args, ctx)),
        }
    except bench.BenchError as exc:
        print(f"kept: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
