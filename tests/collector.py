"""A stand-alone HTTP collector for JSON lines: prints each received line to stdout.

Tests that SIGKILL jitgate run it as a process of its own: `python collector.py PORT`.
It dedupes as docs/audit.md asks of a receiver: a chained record whose writer, seq and
mac it already took (a retry, or a replay after a crash) is answered but not kept again.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

SEEN: set[tuple[object, object, object]] = set()


def fresh(line: str) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return True
    if not isinstance(rec, dict) or "seq" not in rec:
        return True
    key = (rec.get("writer"), rec.get("seq"), rec.get("mac"))
    if key in SEEN:
        return False
    SEEN.add(key)
    return True


async def ingest(request: web.Request) -> web.Response:
    body = await request.text()
    sys.stdout.write("".join(line + "\n" for line in body.splitlines() if line and fresh(line)))
    sys.stdout.flush()
    return web.Response(status=204)


def main() -> None:
    app = web.Application()
    app.router.add_post("/ingest", ingest)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
