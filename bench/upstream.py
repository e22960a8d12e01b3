"""Benchmark upstream: a fixed ~4 KB snapshots answer, a small body for anything else.

python bench/upstream.py --port 8081 [--jwks FILE]

With --jwks, FILE is served at /jwks.json (the key set of the bench's token issuer). For
bench/kept.py a recording also has `big?bytes=N` (N bytes, streamed) and `live` (a line
every 20 ms for up to a minute); any other request's body is counted as it streams in,
never held, and the count is the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from aiohttp import web

SNAPSHOTS = "/api/projects/{project}/session_recordings/{recording}/snapshots"
SMALL_BODY = b'{"ok":true}\n'
RECORDING = "/api/projects/{project}/session_recordings/{recording}"
CHUNK = b"x" * (1 << 16)


def snapshot_body(size: int = 4096) -> bytes:
    """Return a deterministic rrweb-like JSON document of about `size` bytes."""
    events: list[dict[str, object]] = []
    body = b""
    while True:
        i = len(events)
        events.append(
            {
                "type": 3,
                "timestamp": 1_700_000_000_000 + i * 50,
                "data": {"source": 1, "positions": [{"x": 100 + i, "y": 200 + i, "id": 42}]},
            }
        )
        candidate = json.dumps({"snapshots": events}, separators=(",", ":")).encode()
        if len(candidate) > size:
            return body or candidate
        body = candidate


BODY = snapshot_body()


async def snapshots(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def anything(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    if not received:
        return web.Response(body=SMALL_BODY, content_type="application/json")
    return web.json_response({"received": received})


async def big(request: web.Request) -> web.StreamResponse:
    left = int(request.query.get("bytes", "0"))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = left
    await resp.prepare(request)
    while left > 0:
        part = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        await resp.write(part)
        left -= len(part)
    return resp


async def live(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for _ in range(3000):
        await resp.write(b'{"type":3}\n')
        await asyncio.sleep(0.02)
    return resp


def build_app(jwks: bytes | None = None) -> web.Application:
    app = web.Application()
    if jwks is not None:
        body = jwks

        async def keys(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app.router.add_get("/jwks.json", keys)
    app.router.add_get(SNAPSHOTS, snapshots)
    app.router.add_get(RECORDING + "/big", big)
    app.router.add_get(RECORDING + "/live", live)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jwks", type=Path, default=None, help="served at /jwks.json")
    args = parser.parse_args()
    jwks = args.jwks.read_bytes() if args.jwks else None
    web.run_app(build_app(jwks), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
