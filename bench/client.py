"""The upstream client two ways, side by side: aiohttp's ClientSession and jitgate's pool.

    python bench/client.py [--requests 20000] [--concurrency 32] [--rounds 3]

Starts bench/upstream.py, then GETs its ~4 KB snapshots answer `--requests` times,
`--concurrency` at a time, each way in turn (rounds interleaved; medians shown):

- **session:** `aiohttp.ClientSession.request` with the settings jitgate used before
  (no cookies, no default headers, no decompression), as bench/passthrough.py does;
- **pool:** `proxy.upstream.Pool.request`, what jitgate forwards through now.

Reports this process's CPU time per request and requests per second. A benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

import aiohttp
import uvloop
from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

from proxy.upstream import Pool

BENCH = Path(__file__).resolve().parent
PATH = "/api/projects/1/session_recordings/demo-1/snapshots"
Get = Callable[[], Awaitable[tuple[int, bytes]]]


async def run(get: Get, requests: int, concurrency: int) -> tuple[float, float]:
    """Return (CPU seconds, wall seconds) for the requests."""

    async def worker() -> None:
        for _ in range(requests // concurrency):
            status, body = await get()
            if status != 200 or not body:
                raise SystemExit(f"the upstream answered {status}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def main_async(port: int, requests: int, concurrency: int, rounds: int) -> None:
    base = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=60),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE),
    )
    pool = Pool(URL(base), size=100)

    def headers() -> CIMultiDict[str]:
        return CIMultiDict({"Host": f"127.0.0.1:{port}", "X-Forwarded-For": "127.0.0.1"})

    async def via_session() -> tuple[int, bytes]:
        url = URL(base + PATH, encoded=True)
        async with session.request("GET", url, headers=headers(), allow_redirects=False) as r:
            return r.status, await r.read()

    async def via_pool() -> tuple[int, bytes]:
        r = await pool.request("GET", PATH, headers(), None)
        try:
            return r.status, await r.content.read()
        finally:
            r.release()

    ways: dict[str, Get] = {"session": via_session, "pool": via_pool}
    for get in ways.values():  # warm-up: connections open
        await run(get, concurrency * 20, concurrency)
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, get in ways.items():
            figures[name].append(await run(get, requests, concurrency))
    await session.close()
    await pool.close()
    done = requests // concurrency * concurrency
    print(f"{done} requests per round, {concurrency} at a time, {rounds} rounds (medians)")
    print(f"{'':10}{'client us/request':>18}{'requests/s':>12}")
    for name, rows in figures.items():
        cpu = median(r[0] for r in rows) / done * 1e6
        rate = done / median(r[1] for r in rows)
        print(f"{name:10}{cpu:18.1f}{rate:12.0f}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if upstream.poll() is not None:
                    print("bench/upstream.py did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
        uvloop.run(main_async(port, args.requests, args.concurrency, args.rounds))
    finally:
        upstream.terminate()
        upstream.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
