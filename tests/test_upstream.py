"""The upstream connection pool (proxy/upstream.py), through the Forwarder, on real sockets.

tests/test_forward.py checks what is forwarded; these check how connections are used:
reuse and its limits, retrying a request the upstream closed the connection under, the
pool's size, and what happens to a connection whose answer was not read to its end.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_forward import MakeProxy, make_proxy, url_of  # noqa: F401  (make_proxy: a fixture)
from waiting import eventually
from yarl import URL


class ClosingUpstream:
    """A raw HTTP/1.1 server: it answers the first request on each connection with a
    keep-alive response, and closes the connection, unanswered, when a second one comes:
    an upstream that closed an idle connection just as the proxy reused it."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0
        self.reused = 0  # connections closed under a second request
        self.server: asyncio.Server | None = None

    async def start(self) -> URL:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.answered += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if await reader.read(1):  # the next request's first byte
                self.reused += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def closing() -> AsyncIterator[ClosingUpstream]:
    upstream = ClosingUpstream()
    yield upstream
    await upstream.close()


async def test_a_bodiless_request_on_a_connection_closed_under_it_is_tried_once_more(
    closing: ClosingUpstream,
    make_proxy: MakeProxy,  # noqa: F811
) -> None:
    proxy = await make_proxy(await closing.start())
    for _ in range(3):
        async with proxy.client.get("/x") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
    # Each reuse met a closing connection and went again on a new one.
    assert (closing.answered, closing.reused, closing.connections) == (3, 2, 3)


async def test_a_request_that_is_not_safe_to_repeat_is_not_sent_twice(
    closing: ClosingUpstream,
    make_proxy: MakeProxy,  # noqa: F811
) -> None:
    proxy = await make_proxy(await closing.start())
    async with proxy.client.get("/x") as resp:
        assert resp.status == 200
    async with proxy.client.post("/x", data=b"payload") as resp:
        assert resp.status == 502
        assert "upstream protocol error" in await resp.text()
    assert closing.answered == 1
    # Nor a bodiless request whose method is not safe to repeat.
    async with proxy.client.get("/x") as resp:
        assert resp.status == 200
    async with proxy.client.delete("/x") as resp:
        assert resp.status == 502
    assert closing.answered == 2


def gated_upstream() -> tuple[web.Application, dict[str, Any]]:
    state: dict[str, Any] = {"now": 0, "most": 0, "open": asyncio.Event()}

    async def slow(request: web.Request) -> web.Response:
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await state["open"].wait()
        state["now"] -= 1
        return web.Response(text="done")

    async def peer(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(200):  # bounded: 10 s at most
            await resp.write(b"x" * 1024)
            await asyncio.sleep(0.05)  # intended: a stream's pace, until the client leaves
        return resp

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/peer", peer)
    app.router.add_get("/stream", stream)
    return app, state


async def test_no_more_than_pool_size_requests_at_once(
    aiohttp_server: Any,
    make_proxy: MakeProxy,  # noqa: F811
) -> None:
    app, state = gated_upstream()
    upstream: TestServer = await aiohttp_server(app)
    proxy = await make_proxy(url_of(upstream), pool_size=2)

    async def get() -> int:
        async with proxy.client.get("/slow") as resp:
            await resp.read()
            return resp.status

    calls = [asyncio.create_task(get()) for _ in range(5)]
    await eventually(lambda: state["now"] == 2, what="two requests upstream")
    await asyncio.sleep(0.2)  # intended: time for a third to get through if it could
    assert state["most"] == 2
    state["open"].set()
    assert await asyncio.gather(*calls) == [200] * 5
    assert state["most"] == 2


async def test_an_idle_connection_is_kept_for_keepalive_seconds(
    aiohttp_server: Any,
    make_proxy: MakeProxy,  # noqa: F811
) -> None:
    app, _ = gated_upstream()
    upstream: TestServer = await aiohttp_server(app)
    proxy = await make_proxy(url_of(upstream), keepalive=0.3)

    async def port() -> str:
        async with proxy.client.get("/peer") as resp:
            return await resp.text()

    first = await port()
    assert await port() == first  # reused at once
    started = time.monotonic()
    await asyncio.sleep(0.4)  # intended: idle past keepalive, the subject of the test
    assert time.monotonic() - started > 0.3
    assert await port() != first  # a new connection


async def test_an_answer_not_read_to_its_end_closes_its_connection(
    aiohttp_server: Any,
    make_proxy: MakeProxy,  # noqa: F811
) -> None:
    app, _ = gated_upstream()
    upstream: TestServer = await aiohttp_server(app)
    proxy = await make_proxy(url_of(upstream), pool_size=1)
    async with proxy.client.get("/peer") as resp:
        first = await resp.text()
    resp = await proxy.client.get("/stream")
    assert resp.status == 200
    await resp.content.readexactly(1024)
    resp.close()  # the client leaves: its connection is closed
    # That upstream connection is closed, and its slot (the only one) is free again: the
    # next request goes through, on a new connection.

    async def port() -> str:
        async with proxy.client.get("/peer") as resp:
            return await resp.text()

    assert await asyncio.wait_for(port(), 10) != first


async def test_an_early_answer_to_an_upload_is_relayed(
    aiohttp_server: Any,
    make_proxy: MakeProxy,  # noqa: F811
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=413, text="too large")  # the body is never read

    app = web.Application(client_max_size=1024)
    app.router.add_post("/upload", refuse)
    upstream: TestServer = await aiohttp_server(app)
    proxy = await make_proxy(url_of(upstream))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * 65536

    async with proxy.client.post("/upload", data=body()) as resp:
        assert (resp.status, await resp.text()) == (413, "too large")
    async with proxy.client.get("/anything") as resp:  # the pool is still usable
        assert resp.status in (200, 404)


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.parametrize("trusted", [True, False])
async def test_an_https_upstream_is_verified(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aiohttp_server: Any,
    make_proxy: MakeProxy,  # noqa: F811
    trusted: bool,
) -> None:
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app, _ = gated_upstream()
    upstream: TestServer = await aiohttp_server(app, ssl=context)
    if trusted:  # the system's trust store, as OpenSSL reads it, holds the test CA
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    proxy = await make_proxy(URL(f"https://127.0.0.1:{upstream.port}"))
    async with proxy.client.get("/peer") as resp:
        if trusted:
            assert resp.status == 200
        else:
            assert resp.status == 502
            assert "upstream" in await resp.text()
