"""Streams and WebSockets through the gate end when their grant does, on every replica."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, bearer, free_port, make_token, write_config
from redis.asyncio import Redis
from waiting import eventually

from proxy.grantstore import RedisGrants
from proxy.state import STATE

WS = "/api/projects/1/session_recordings/demo-1/live"
STREAM = "/api/projects/1/session_recordings/demo-1/snapshots"


def live_upstream() -> web.Application:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(600):  # a minute of events unless cut
            await resp.write(b'{"type":3}\n')
            await asyncio.sleep(0.1)  # intended: a live stream's pace, until it is cut
        return resp

    app = web.Application()
    app.router.add_get(WS, ws_echo)
    app.router.add_get(STREAM, stream)
    return app


@pytest.fixture
async def gated(make_proxy: ProxyFactory, aiohttp_server: Any) -> TestClient:
    server = await aiohttp_server(live_upstream())
    client: TestClient = await make_proxy(upstream_url=str(server.make_url("")).rstrip("/"))
    return client


async def ws_closed_within(ws: aiohttp.ClientWebSocketResponse, limit: float) -> tuple[float, int]:
    started = time.monotonic()
    while True:
        msg = await asyncio.wait_for(ws.receive(), limit)
        if msg.type is WSMsgType.CLOSE:  # the close frame jitgate sent, with its code
            return time.monotonic() - started, int(msg.data)
        if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING):
            return time.monotonic() - started, ws.close_code or 0


async def test_revoke_closes_a_live_websocket(gated: TestClient, redis_url: str) -> None:
    grant = await gated.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "r", "t")
    async with gated.ws_connect(WS, headers=bearer()) as ws:
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "hello"
        other = Redis.from_url(redis_url)
        await RedisGrants(other).revoke(grant.id)  # as another replica or the CLI would
        took, code = await ws_closed_within(ws, 2.0)
        await other.aclose()
    assert code == 1008
    assert took < 1.0
    metrics = await (await gated.get("/_jit/metrics")).text()
    assert 'jitgate_live_connections_cut_total{reason="revoked"} 1.0' in metrics


async def test_expiry_closes_a_live_websocket(gated: TestClient) -> None:
    grant = await gated.app[STATE].grants.add("alice", "recording:1/demo-1", 1.0, "r", "t")
    async with gated.ws_connect(WS, headers=bearer()) as ws:
        await ws.send_str("x")
        await ws.receive_str()
        _, code = await ws_closed_within(ws, 3.0)
    assert code == 1008
    assert time.time() - grant.expires_at < 1.0


async def test_revoke_cuts_a_streaming_response(gated: TestClient) -> None:
    grant = await gated.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "r", "t")
    r = await gated.get(STREAM, headers=bearer())
    assert r.status == 200
    await r.content.readline()
    await gated.app[STATE].grants.revoke(grant.id)
    started = time.monotonic()
    with pytest.raises(aiohttp.ClientPayloadError):
        while await asyncio.wait_for(r.content.readline(), 2.0):
            pass
    assert time.monotonic() - started < 1.0


def _serve(cfg: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "JITGATE_LISTEN__PORT": str(port)}
    jitgate = str(Path(sys.executable).parent / "jitgate")
    log = (cfg.parent / f"jitgate-{port}.log").open("wb")
    return subprocess.Popen(
        [jitgate, "serve", "--config", str(cfg)], env=env, stdout=log, stderr=log
    )


@pytest.fixture
def two_replicas(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, str, str]]:
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM_SCRIPT, str(up_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cfg = write_config(
        tmp_path,
        upstream_url=f"http://127.0.0.1:{up_port}",
        redis_url=redis_url,
        extra="admins: {groups: [security]}",
    )
    ports = free_port(), free_port()
    procs = [_serve(cfg, p) for p in ports]
    try:
        yield f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", str(cfg)
    finally:
        for p in [*procs, upstream]:
            p.terminate()
        for p in [*procs, upstream]:
            p.wait(timeout=15)


UPSTREAM_SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from aiohttp import web
from test_live_gate import live_upstream
web.run_app(live_upstream(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


async def _ready(base: str) -> None:
    async with aiohttp.ClientSession() as s:

        async def ready() -> bool:
            try:
                async with s.get(base + "/_jit/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, interval=0.1, what=f"{base} to be ready")


async def test_two_replicas_revoke_on_one_holds_on_the_other(
    two_replicas: tuple[str, str, str], redis_url: str
) -> None:
    a, b, _ = two_replicas
    await asyncio.gather(_ready(a), _ready(b))
    client = Redis.from_url(redis_url)
    grants = RedisGrants(client)
    grant = await grants.add("alice", "recording:1/demo-1", 60, "r", "t")
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    async with aiohttp.ClientSession() as s, s.ws_connect(b + WS, headers=headers) as ws:
        await ws.send_str("x")
        assert (await ws.receive_str()) == "x"
        # An admin revokes through replica A's API; B must refuse and cut at once.
        admin = {"Authorization": f"Bearer {make_token('sam', groups=['security'])}"}
        async with s.post(f"{a}/_jit/api/grants/{grant.id}/revoke", headers=admin) as r:
            assert r.status == 200, await r.text()
        revoked_at = time.monotonic()
        async with s.get(b + STREAM, headers=headers) as r:
            assert r.status == 403
            assert json.loads(await r.text())["error"] == "access_denied"
        assert time.monotonic() - revoked_at < 0.1
        took, code = await ws_closed_within(ws, 2.0)
        assert code == 1008 and took < 1.0
    await client.aclose()
