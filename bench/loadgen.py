"""HTTP load generator: GET one URL for D seconds; prints JSON stats.

    python bench/loadgen.py http://127.0.0.1:8080/path -c 32 -d 10 -H 'Authorization: Bearer x'
    python bench/loadgen.py http://127.0.0.1:8080/path --rate 1000 -c 64 -d 10

Closed loop (the default): C workers, each sending its next request when the last one is
answered; the fallback when wrk is not installed. Open loop (`--rate R`): request i is due
at start + i/R whatever happened before, over up to C connections, and its latency counts
from when it was due, so a stall shows in the percentiles instead of slowing the sender
(no coordinated omission). It is one Python process, so on a small machine it is often the
bottleneck itself: compare its figures with each other, not with wrk's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    bytes_read: int = 0


def percentile(ordered: list[float], pct: float) -> float | None:
    """Return the nearest-rank percentile of an already sorted list."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def _get(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    since: float,
    stats: Stats,
) -> None:
    """GET once and record it: its latency counted from `since`, or its exception."""
    try:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        stats.exceptions[type(exc).__name__] += 1
        return
    stats.latencies.append(time.perf_counter() - since)
    stats.statuses[status] += 1
    stats.bytes_read += len(body)


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    stop_at: float,
    stats: Stats,
) -> None:
    while (started := time.perf_counter()) < stop_at:
        await _get(session, url, headers, started, stats)


async def run(
    url: str, headers: dict[str, str], duration: float, connections: int, request_timeout: float
) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout)
    ) as session:
        stats = Stats()
        started = time.perf_counter()
        await asyncio.gather(
            *(_worker(session, url, headers, started + duration, stats) for _ in range(connections))
        )
        elapsed = time.perf_counter() - started
    return _result(stats, elapsed)


def _result(stats: Stats, elapsed: float) -> dict[str, object]:
    ordered = sorted(stats.latencies)
    completed = len(ordered)
    non_2xx = sum(n for status, n in stats.statuses.items() if not 200 <= status < 300)
    p50, p99, p999 = (percentile(ordered, p) for p in (50, 99, 99.9))
    return {
        "requests": completed,
        "elapsed_s": round(elapsed, 3),
        "rps": completed / elapsed if elapsed > 0 else 0.0,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "p999_ms": None if p999 is None else p999 * 1000,
        "errors": non_2xx + sum(stats.exceptions.values()),
        "non_2xx": non_2xx,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "exceptions": dict(stats.exceptions),
        "bytes_read": stats.bytes_read,
    }


async def run_rate(
    url: str,
    headers: dict[str, str],
    duration: float,
    connections: int,
    request_timeout: float,
    rate: float,
) -> dict[str, object]:
    """Open loop: send at a constant rate, latency counted from each request's due time."""
    clock = time.perf_counter
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout)
    ) as session:
        total = int(duration * rate)
        started = clock()
        tasks: list[asyncio.Task[None]] = []
        while len(tasks) < total:
            now = clock()
            # Every request due by now goes out in this turn, each stamped with its due time.
            while len(tasks) < total and started + len(tasks) / rate <= now:
                due = started + len(tasks) / rate
                tasks.append(asyncio.create_task(_get(session, url, headers, due, stats)))
            await asyncio.sleep(max(0.0, started + len(tasks) / rate - clock()))
        await asyncio.gather(*tasks)
        elapsed = clock() - started
    return _result(stats, elapsed)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("-H", "--header", type=_header, action="append", default=[])
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests/s")
    args = parser.parse_args()
    if args.connections < 1 or args.duration <= 0 or (args.rate is not None and args.rate <= 0):
        parser.error("--connections, --duration and --rate must be positive")
    common = (args.url, dict(args.header), args.duration, args.connections, args.timeout)
    if args.rate is None:
        result = asyncio.run(run(*common))
    else:
        result = asyncio.run(run_rate(*common, args.rate))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
