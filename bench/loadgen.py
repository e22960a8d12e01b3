"""Closed-loop HTTP load generator: C workers GET one URL for D seconds; prints JSON stats.

    python bench/loadgen.py http://127.0.0.1:8080/path -c 32 -d 10 -H 'Authorization: Bearer x'

The fallback when wrk is not installed. It is one Python process, so on a small machine it
is often the bottleneck itself: compare its figures with each other, not with wrk's.
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


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    stop_at: float,
    stats: Stats,
) -> None:
    clock = time.perf_counter
    while (started := clock()) < stop_at:
        try:
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            stats.exceptions[type(exc).__name__] += 1
            continue
        stats.latencies.append(clock() - started)
        stats.statuses[status] += 1
        stats.bytes_read += len(body)


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
    ordered = sorted(stats.latencies)
    completed = len(ordered)
    non_2xx = sum(n for status, n in stats.statuses.items() if not 200 <= status < 300)
    p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
    return {
        "requests": completed,
        "elapsed_s": round(elapsed, 3),
        "rps": completed / elapsed if elapsed > 0 else 0.0,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "errors": non_2xx + sum(stats.exceptions.values()),
        "non_2xx": non_2xx,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "exceptions": dict(stats.exceptions),
        "bytes_read": stats.bytes_read,
    }


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
    args = parser.parse_args()
    if args.connections < 1 or args.duration <= 0:
        parser.error("--connections and --duration must be positive")
    result = asyncio.run(
        run(args.url, dict(args.header), args.duration, args.connections, args.timeout)
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
