"""Hostile clients: oversized request lines and headers, too many headers, bodies and
WebSocket messages over their caps, idle keep-alive connections, and slowloris. Each is
answered (414, 431, 400, 413, close 1009) or dropped, with one WARNING line and never an ERROR."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import RedisServer, Upstream, bearer, make_token
from hostilekit import exchange, status_of, timed_gets, trickle
from proxykit import running

LIMITS = (
    "max_line_bytes: 2048, max_field_bytes: 4096, max_headers: 20, keepalive_timeout: 0.5, "
    "max_body_bytes: 1000, max_ws_message_bytes: 1000"
)


def _addr(server: TestServer) -> tuple[str, int]:
    return str(server.host), int(server.port or 0)


def _no_errors_one_warning(caplog: pytest.LogCaptureFixture, n: int = 1) -> None:
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    bad = [r for r in caplog.records if r.getMessage().startswith("bad request from")]
    assert len(bad) == n and all(r.levelno == logging.WARNING and not r.exc_info for r in bad)


async def test_a_9kb_bearer_token_is_431_with_one_line(
    redis_server: RedisServer, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(upstream.url, redis_server.url) as (server, _, _):
        token = make_token("alice", pad="x" * 9000)
        assert len(token) > 9000
        answer = await exchange(
            *_addr(server),
            f"GET /static/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
        )
    assert status_of(answer) == 431
    _no_errors_one_warning(caplog)
    assert upstream.hits == []


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /static/" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /_jit/healthz?" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /static/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        (
            b"GET /static/x HTTP/1.1\r\nHost: x\r\n"
            + b"".join(f"X-H{n}: v\r\n".encode() for n in range(30))
            + b"\r\n",  # more headers than max_headers
            431,
        ),
        # Past twice the limits aiohttp's parser refuses it first: its 400.
        (b"GET /static/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /static/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 400),
    ],
    ids=["line", "own-endpoint", "field", "count", "line-past-parser", "field-past-parser"],
)
async def test_over_the_limits_is_answered_with_one_line(
    redis_server: RedisServer,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
    status: int,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(upstream.url, redis_server.url, listen=LIMITS) as (server, _, _):
        assert status_of(await exchange(*_addr(server), head)) == status
        # Within the limits, the same request goes through.
        ok = b"GET /static/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert status_of(await exchange(*_addr(server), ok)) == 200
    _no_errors_one_warning(caplog)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_its_cap_is_413(
    redis_server: RedisServer, upstream: Upstream, chunked: bool
) -> None:
    async with running(upstream.url, redis_server.url, listen=LIMITS) as (server, _, _):
        url = server.make_url("/dashboard")
        async with aiohttp.ClientSession() as http:

            async def post(size: int) -> int:
                body: object = b"x" * size
                if chunked:

                    async def parts() -> object:
                        for _ in range(size // 100):
                            yield b"x" * 100

                    body = parts()
                async with http.post(url, data=body, headers=bearer()) as r:
                    return r.status

            assert await post(900) == 200
            assert await post(5000) == 413
    # With a Content-Length the upstream never hears of it; a chunked one is cut off there.
    assert 1 <= len(upstream.hits) <= 1 + chunked


async def test_a_websocket_message_over_its_cap_closes_1009(
    redis_server: RedisServer, aiohttp_server: object
) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_bytes(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    up = await aiohttp_server(app)  # type: ignore[operator]
    upstream_url = str(up.make_url("")).rstrip("/")
    async with (
        running(upstream_url, redis_server.url, listen=LIMITS) as (server, _, _),
        aiohttp.ClientSession() as http,
        http.ws_connect(server.make_url("/static/ws"), max_msg_size=0) as ws,
    ):
        await ws.send_bytes(b"x" * 500)
        assert (await ws.receive()).data == b"x" * 500
        await ws.send_bytes(b"x" * 5000)
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009


async def test_an_idle_keepalive_connection_is_closed(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    async with running(upstream.url, redis_server.url, listen=LIMITS) as (server, _, _):
        # One request, then nothing: the server closes the connection after 0.5 s.
        answer = await exchange(
            *_addr(server), b"GET /static/x HTTP/1.1\r\nHost: x\r\n\r\n", within=10
        )
    assert status_of(answer) == 200  # and exchange returned: the server closed it


async def test_slowloris_does_not_stop_a_normal_client(
    redis_server: RedisServer, upstream: Upstream
) -> None:
    async with running(upstream.url, redis_server.url) as (server, _, _):
        host, port = _addr(server)
        slow = asyncio.create_task(trickle(host, port, 100, 0.05, 3.0))
        await asyncio.sleep(0.5)
        answers = await timed_gets(str(server.make_url("/static/x")), 2.0, {})
        await slow
    assert answers and {s for _, s in answers} == {200}
