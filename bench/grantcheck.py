"""The grant check three ways, side by side: client CPU per check, one process, one Redis.

    python bench/grantcheck.py [--checks 20000] [--concurrency 32]

Starts its own redis-server, adds one active grant, then runs `--checks` checks,
`--concurrency` at a time, each way in turn (three rounds, interleaved; medians shown):

- **direct:** `RedisGrants.check`, one script call per check (jitgate without the view).
- **pipelined:** the checks that arrive in one event-loop turn go out together as one
  redis-py pipeline of the same script calls (auto-pipelining), and each gets its answer.
- **view:** `GrantView` in front of the store, its event feed following (jitgate's choice):
  after the first check, answered from memory.

Reports this process's CPU time per check (`time.process_time`), checks per second and
Redis's own CPU per check. It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

import redis as redis_sync
import uvloop
from redis.asyncio import Redis

from proxy.grantstore import RedisGrants
from proxy.grantview import GrantView

USER, SCOPES = "alice", ("recording:1/demo-1", "project:1")
Check = Callable[[str, tuple[str, ...]], Awaitable[tuple[str, float] | None]]


class Pipelined:
    """Checks made in the same event-loop turn share one pipeline round trip."""

    def __init__(self, store: RedisGrants) -> None:
        self.store = store
        self.waiting: list[tuple[str, tuple[str, ...], asyncio.Future[object]]] = []

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self.waiting.append((user, scopes, future))
        if len(self.waiting) == 1:
            loop.call_soon(lambda: asyncio.ensure_future(self._send()))
        found = await future
        return (found[0].decode(), int(found[1]) / 1000) if found else None  # type: ignore[index]

    async def _send(self) -> None:
        batch, self.waiting = self.waiting, []
        pipe = self.store.redis.pipeline(transaction=False)
        now = int(time.time() * 1000)
        for user, scopes, _ in batch:
            keys = [self.store._active_key(user, scope) for scope in scopes]
            await self.store._check(keys=keys, args=[now], client=pipe)
        try:
            results = await pipe.execute()
        except Exception as exc:
            for _, _, future in batch:
                future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            future.set_result(result)


async def run(check: Check, checks: int, concurrency: int) -> tuple[float, float]:
    """Return (CPU seconds, wall seconds) for `checks` checks, `concurrency` at a time."""
    per_worker = checks // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            if await check(USER, SCOPES) is None:
                raise SystemExit("a check found no grant")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


def redis_cpu(client: redis_sync.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def main_async(sock: Path, checks: int, concurrency: int, rounds: int) -> None:
    client = Redis(unix_socket_path=str(sock))
    cpu_of = redis_sync.Redis(unix_socket_path=str(sock))
    store = RedisGrants(client)
    await store.add(USER, SCOPES[1], 3600, "bench", "bench")
    view = GrantView(store)
    follower = asyncio.create_task(view.follow(store.events))
    for _ in range(1000):  # the feed's first answered ping
        if view.current():
            break
        await asyncio.sleep(0.01)
    ways: dict[str, Check] = {
        "direct": store.check,
        "pipelined": Pipelined(store).check,
        "view": view.check,
    }
    for check in ways.values():  # warm-up: scripts loaded, connections open
        await run(check, concurrency * 10, concurrency)
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, check in ways.items():
            before = redis_cpu(cpu_of)
            cpu, wall = await run(check, checks, concurrency)
            figures[name].append((cpu, wall, redis_cpu(cpu_of) - before))
    follower.cancel()
    await client.aclose()
    cpu_of.close()
    done = checks // concurrency * concurrency
    print(f"{done} checks per round, {concurrency} at a time, {rounds} rounds (medians)")
    print(f"{'':12}{'client us/check':>16}{'checks/s':>12}{'redis us/check':>16}")
    for name, rows in figures.items():
        cpu = median(r[0] for r in rows) / done * 1e6
        rate = done / median(r[1] for r in rows)
        server = median(r[2] for r in rows) / done * 1e6
        print(f"{name:12}{cpu:16.1f}{rate:12.0f}{server:16.1f}")
    print(f"view: {view.hits} answered from memory, {view.misses} from Redis")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checks", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is missing", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="jitgate-grantcheck-"))
    sock = tmp / "redis.sock"  # a socket file of its own: no port to share with anyone
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists():
                break
            if proc.poll() is not None:
                print("redis-server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        uvloop.run(main_async(sock, args.checks, args.concurrency, args.rounds))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
