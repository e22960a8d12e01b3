"""Hostile clients: 300 slowloris connections (headers sent a byte at a time, from another
process) while a well-behaved client asks for a page one request after another; then
oversized request lines and headers, too many headers, and a 9 KB bearer token; then an
idle keep-alive connection.

Targets: the well-behaved client's p99 under 100 ms, all 200; each oversized request
answered as HTTP says (414 for the request line, 431 for headers; 400 from the parser past
twice the limits) with one WARNING line and no ERROR; the idle connection closed after
listen.keepalive_timeout."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, make_token  # noqa: E402
from hostilekit import exchange, status_of, timed_gets, trickle_elsewhere  # noqa: E402
from proxykit import counting_logs, percentile, plain_upstream, running  # noqa: E402

SLOW_CONNS, EVERY, SECONDS = 300, 0.1, 10.0
KEEPALIVE = 1.0
OVERSIZED = {  # (request, the status it must get)
    "request line": (b"GET /static/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "header": (b"GET /static/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    "header count": (
        b"GET /static/x HTTP/1.1\r\nHost: x\r\n"
        + b"".join(f"X-H{n}: v\r\n".encode() for n in range(150))
        + b"\r\n",
        431,
    ),
    "9 KB bearer token": (
        b"GET /static/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + make_token("alice", pad="x" * 9000).encode()
        + b"\r\n\r\n",
        431,
    ),
    "past the parser's limit": (
        b"GET /static/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
}


async def main() -> int:
    redis = RedisServer()
    redis.start()
    bad = counting_logs(lambda record: record.getMessage().startswith("bad request from"))
    try:
        listen = f"keepalive_timeout: {KEEPALIVE}"
        async with (
            plain_upstream() as up,
            running(up, redis.url, listen=listen) as (server, *_),
        ):
            host, port = str(server.host), int(server.port or 0)
            slow = trickle_elsewhere(host, port, SLOW_CONNS, EVERY, SECONDS)
            await asyncio.sleep(2.0)  # every slow connection open and trickling
            answers = await timed_gets(str(server.make_url("/static/x")), SECONDS - 3.0, {})
            await asyncio.to_thread(slow.join, 10)
            with bad as count:
                statuses = {
                    n: status_of(await exchange(host, port, h)) for n, (h, _) in OVERSIZED.items()
                }
            started = time.monotonic()
            idle = await exchange(
                host, port, b"GET /static/x HTTP/1.1\r\nHost: x\r\n\r\n", within=10
            )
            closed_after = time.monotonic() - started
    finally:
        redis.close()
    p99 = percentile([t for t, _ in answers], 99) * 1000
    not_ok = sum(1 for _, s in answers if s != 200)
    wrong = {k: v for k, v in statuses.items() if v != OVERSIZED[k][1]}
    reaped = status_of(idle) == 200 and KEEPALIVE <= closed_after < KEEPALIVE + 1.0
    ok = (
        p99 < 100 and not not_ok and not wrong and not count.errors
        and count.matched == len(OVERSIZED) and reaped
    )  # fmt: skip
    print(
        f"hostile: normal client p99 {p99:.0f} ms ({len(answers)} requests, {not_ok} not 200) "
        f"beside {SLOW_CONNS} slowloris connections; oversized {len(OVERSIZED) - len(wrong)}/"
        f"{len(OVERSIZED)} answered as expected (414, 431 x3, 400) {wrong or ''}"
        f"with {count.matched} WARNING lines "
        f"and {len(count.errors)} ERROR; idle keep-alive closed after {closed_after:.2f} s "
        f"(keepalive_timeout {KEEPALIVE:g}); load average {os.getloadavg()[0]:.1f} "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
