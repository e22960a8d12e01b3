"""A stand-alone HTTP collector for JSON lines: prints each received line to stdout.

Tests that SIGKILL jitgate run it as a process of its own: `python collector.py PORT`.
"""

from __future__ import annotations

import sys

from aiohttp import web


async def ingest(request: web.Request) -> web.Response:
    body = await request.text()
    sys.stdout.write("".join(line + "\n" for line in body.splitlines() if line))
    sys.stdout.flush()
    return web.Response(status=204)


def main() -> None:
    app = web.Application()
    app.router.add_post("/ingest", ingest)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
