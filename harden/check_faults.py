"""Upstream faults: 10,000 requests through jitgate to an upstream that misbehaves in every
way tests/faultkit.py knows (connection refused, reset before the headers and in the
body, a first byte later than read_timeout, a stalled body, a 5xx, an invalid header, a
refused WebSocket upgrade), 50 at a time.

Targets: each answered as it should be (502 or 504 with a JSON body for scripts and a
page for browsers, the connection cut when the status line had already gone out, a 5xx
or a refused upgrade relayed), an audit record and one WARNING line per failure, no ERROR
in the log, and no file descriptor left open after the run."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer  # noqa: E402
from faultkit import FAULTS, run_faults  # noqa: E402

TOTAL, CONCURRENCY = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000, 50


async def main() -> int:
    redis = RedisServer()
    redis.start()
    try:
        figures = await run_faults(redis.url, TOTAL, CONCURRENCY)
    finally:
        redis.close()
    problems = figures.problems()
    print(
        f"faults: {figures.requests} requests over {len(FAULTS)} faults, "
        f"{figures.tally.count_wrong} wrong answers, open fds {figures.leaked_fds:+d} after "
        f"(Redis pool {figures.redis_pool_growth:+d}), "
        f"{figures.failures_audited}/{figures.failures_sent} failures audited, "
        f"{figures.warnings} WARNING lines, {len(figures.errors)} ERROR lines"
        f"{' (' + '; '.join(problems[:3]) + ')' if problems else ''} "
        f"{'FAIL' if problems else 'PASS'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    logging.getLogger().addHandler(logging.NullHandler())  # counted by run_faults, not printed
    sys.exit(asyncio.run(main()))
