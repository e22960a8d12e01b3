"""Baseline for the benchmark: a plain aiohttp reverse proxy with no checks at all.

    python bench/passthrough.py --port 8082 --upstream http://127.0.0.1:8081

One pooled ClientSession, hop-by-hop headers dropped, the response streamed back as it
arrives: the least any aiohttp proxy does, so jitgate's overhead can be read against it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _filtered(src: MultiMapping[str], drop: frozenset[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in src.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    try:
        async with session.request(
            request.method,
            url,
            headers=_filtered(request.headers, HOP_BY_HOP | {"host"}),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            resp = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=_filtered(upstream.headers, HOP_BY_HOP),
            )
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            return resp
    except aiohttp.ClientError as exc:
        return web.Response(status=502, text=f"passthrough: upstream error {exc!r}\n")


async def _session(app: web.Application) -> AsyncIterator[None]:
    # Same client settings as jitgate's forwarder, so only the checks differ.
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=60),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE),
    )
    yield
    await app[SESSION].close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(upstream: str, handler: Handler = proxy) -> web.Application:
    """The pass-through app; bench/naive.py hands in its checked handler instead."""
    app = web.Application(client_max_size=0)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    args = parser.parse_args()
    web.run_app(
        build_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
