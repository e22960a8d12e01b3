"""The OpenReplay preset end to end: jitgate with `preset: openreplay` in front of a fake
OpenReplay answering with OpenReplay's response shapes (tests/fixtures/presets/openreplay/,
README.md there says where each came from), the live assist socket included."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, bearer
from redis.asyncio import Redis
from storagekit import Storage
from test_path_tricks import raw_request, tricks_on

from proxy.grantstore import RedisGrants

FIXTURES = ROOT / "tests" / "fixtures" / "presets" / "openreplay"
SESSION = "7391450123456789012"
SCOPE = f"session:5/{SESSION}"
MINIO = "http://minio.invalid"
SOCKET = f"/ws-assist/socket/?EIO=4&transport=websocket&peerId=pk123-{SESSION}&identity=agent"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class FakeOpenReplay:
    url: str = ""
    hits: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
async def openreplay(aiohttp_server: Any, storage: Storage) -> FakeOpenReplay:
    fake = FakeOpenReplay()

    def answer(name: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            fake.hits.append((request.method, request.raw_path))
            # The fixture's made-up MinIO host: presigned by a real local "S3" instead.
            return web.json_response(storage.presign_all(fixture(name), MINIO))

        return handler

    async def mob(request: web.Request) -> web.Response:
        fake.hits.append((request.method, request.raw_path))
        return web.Response(body=b"\x00mob", content_type="application/octet-stream")

    async def socket(request: web.Request) -> web.StreamResponse:
        fake.hits.append((request.method, request.raw_path))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:  # socket.io's text frames, echoed with the peer it named
            await ws.send_str(f"{msg.data}|{request.query.get('peerId')}")
        return ws

    app = web.Application()
    for prefix in ("/api", "/v2/api", ""):
        base = prefix + "/{project}/sessions/{session}"
        app.router.add_get(base + "/replay", answer("replay.json"))
        app.router.add_get(base + "/first-mob", answer("first_mob.json"))
        app.router.add_post(prefix + "/{project}/mobile/{session}/urls", answer("mobile_urls.json"))
        app.router.add_get(base + "/events", answer("events.json"))
        app.router.add_get(base + "/notes", answer("notes.json"))
        app.router.add_get(prefix + "/{project}/unprocessed/{session}/dom.mob", mob)
        app.router.add_post(prefix + "/{project}/sessions/search", answer("search.json"))
        app.router.add_get(prefix + "/{project}/assist/sessions/{session}", answer("replay.json"))
    app.router.add_route(
        "*", "/api/{project}/integrations/{i}/notify/{rest:.*}", answer("notes.json")
    )
    app.router.add_route("*", "/replay-exporter/{rest:.*}", answer("notes.json"))
    app.router.add_post("/ingest/v1/web/start", answer("start.json"))
    app.router.add_post("/ingest/v1/web/i", mob)
    app.router.add_get("/ws-assist/socket/", socket)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gate(
    make_proxy: ProxyFactory, openreplay: FakeOpenReplay, storage: Storage
) -> TestClient:
    return await make_proxy(
        upstream_url=openreplay.url, policy_text="preset: openreplay\n", extra=storage.config()
    )


async def grant(redis_url: str, scope: str) -> str:
    redis = Redis.from_url(redis_url)
    try:
        return (await RedisGrants(redis).add("alice", scope, 600, "preset test", "test")).id
    finally:
        await redis.aclose()


CONTENT = [f"/api/5/sessions/{SESSION}/replay", f"/api/5/sessions/{SESSION}/events",
           f"/api/5/sessions/{SESSION}/notes", f"/v2/api/5/sessions/{SESSION}/replay",
           f"/5/sessions/{SESSION}/events", f"/api/5/unprocessed/{SESSION}/dom.mob?end=1",
           f"/api/5/assist/sessions/{SESSION}"]  # fmt: skip


async def test_sessions_refused_without_a_grant(
    gate: TestClient, openreplay: FakeOpenReplay
) -> None:
    for path in CONTENT:
        resp = await gate.get(path, headers={**bearer(), "Accept": "application/json"})
        assert resp.status == 403, path
        assert (await resp.json())["scope"] == SCOPE
        assert (await gate.get(path, headers={"Accept": "application/json"})).status == 401
    assert openreplay.hits == []


@pytest.mark.parametrize("scope", [SCOPE, "project:5"])
async def test_sessions_served_under_a_grant(
    gate: TestClient, openreplay: FakeOpenReplay, storage: Storage, redis_url: str, scope: str
) -> None:
    await grant(redis_url, scope)
    for path in CONTENT:
        resp = await gate.get(path, headers=bearer())
        assert resp.status == 200, path
        if path.endswith("replay") or "/assist/" in path:
            data = (await resp.json())["data"]
            assert data["sessionId"] == SESSION and data["domURL"]
            if path.endswith("replay"):  # the mob files by grant-bound blob URLs
                assert all(u.startswith("/_jit/blob/") for u in data["domURL"])
                mob = await gate.get(data["devtoolsURL"][0], headers=bearer())
                assert await mob.read() == f"file /mobs/{SESSION}/devtools.mob".encode()
        elif path.endswith("events"):
            assert [e["type"] for e in (await resp.json())["data"]["events"]] == [
                "LOCATION",
                "CLICK",
            ]
        elif path.endswith("notes"):
            assert (await resp.json())["data"][0]["sessionId"] == SESSION
        else:
            assert await resp.read() == b"\x00mob"
    assert len(openreplay.hits) == len(CONTENT)
    assert storage.hits == [(f"/mobs/{SESSION}/devtools.mob", 200)] * 2
    other = await gate.get(f"/api/6/sessions/{SESSION}/replay", headers=bearer())
    assert other.status == 403
    # The session's grant is for that session; the project's covers its other sessions.
    sibling = await gate.get("/api/5/sessions/1/replay", headers=bearer())
    assert sibling.status == (200 if scope == "project:5" else 403)


async def test_first_mob_and_mobile_urls_are_blob_urls(
    gate: TestClient, storage: Storage, redis_url: str
) -> None:
    await grant(redis_url, SCOPE)
    first = await gate.get(f"/v2/api/5/sessions/{SESSION}/first-mob", headers=bearer())
    (dom,) = (await first.json())["data"]["domURL"]
    mobile = await gate.post(f"/api/5/mobile/{SESSION}/urls", json={"keys": []}, headers=bearer())
    urls = (await mobile.json())["data"]
    assert len(urls) == 2 and all(u.startswith("/_jit/blob/") for u in [dom, *urls])
    got = await gate.get(urls[1], headers=bearer())
    assert await got.read() == f"file /pk123/{SESSION}/replay.frames.zst".encode()
    assert (await gate.get(dom, headers=bearer())).status == 200
    assert [status for _, status in storage.hits] == [200, 200]


async def test_presigned_urls_never_pass_without_blob_origins(
    make_proxy: ProxyFactory, openreplay: FakeOpenReplay, storage: Storage, redis_url: str
) -> None:
    # Without `blobs.origins` the replay cannot be rewritten: refused, never passed on.
    gate = await make_proxy(upstream_url=openreplay.url, policy_text="preset: openreplay\n")
    await grant(redis_url, SCOPE)
    resp = await gate.get(f"/api/5/sessions/{SESSION}/replay", headers=bearer())
    text = await resp.text()
    assert resp.status == 502 and "is not in blobs.origins" in text
    assert "X-Amz-" not in text
    events = await gate.get(f"/api/5/sessions/{SESSION}/events", headers=bearer())
    assert events.status == 200  # answers without presigned URLs are untouched


async def test_search_identity_only_shares_and_exports_blocked(
    gate: TestClient, openreplay: FakeOpenReplay, redis_url: str
) -> None:
    for path in ("/v2/api/5/sessions/search", "/api/5/sessions/search"):
        resp = await gate.post(path, json={"limit": 10, "page": 1}, headers=bearer())
        assert resp.status == 200 and await resp.json() == fixture("search.json")
        assert (
            await gate.post(path, json={}, headers={"Accept": "application/json"})
        ).status == 401
    await grant(redis_url, "project:5")
    blocked = [("POST", f"/api/5/integrations/slack/notify/3/sessions/{SESSION}"),
               ("POST", "/replay-exporter/5/session-videos"),
               ("GET", f"/replay-exporter/5/session-videos/{SESSION}"),
               ("PATCH", "/spot/spots/42/public-key")]  # fmt: skip
    for method, path in blocked:
        resp = await gate.request(method, path, headers=bearer())
        assert resp.status == 403, path
        assert (await resp.json())["error"] == "blocked"
    assert len(openreplay.hits) == 2


async def test_tracker_collectors_are_public(gate: TestClient, openreplay: FakeOpenReplay) -> None:
    start = {"projectKey": "pk123", "trackerVersion": "16.2.1", "timestamp": 1764835200000}
    resp = await gate.post("/ingest/v1/web/start", json=start)
    assert resp.status == 200 and await resp.json() == fixture("start.json")
    resp = await gate.post("/ingest/v1/web/i", data=b"\x01\x02batch")
    assert resp.status == 200
    assert openreplay.hits == [("POST", "/ingest/v1/web/start"), ("POST", "/ingest/v1/web/i")]
    # A collector path is no way into a session.
    got, _ = await raw_request(
        gate, f"/ingest/v1/web/i/../../../../api/5/sessions/{SESSION}/replay"
    )
    assert got == 403 and len(openreplay.hits) == 2


async def test_assist_socket_needs_a_live_assist_grant(
    gate: TestClient, openreplay: FakeOpenReplay, redis_url: str
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as anon:
        await gate.ws_connect(SOCKET)
    assert anon.value.status == 401
    await grant(redis_url, SCOPE)  # a session's grant does not open live assist
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gate.ws_connect(SOCKET, headers=bearer())
    assert refused.value.status == 403
    polling = await gate.get("/ws-assist/socket/?EIO=4&transport=polling", headers=bearer())
    assert polling.status == 403
    assert (await gate.get("/ws-assist/assist/key/sockets-list", headers=bearer())).status == 403
    assert openreplay.hits == []

    live = await grant(redis_url, "assist:live")
    async with gate.ws_connect(SOCKET, headers=bearer()) as ws:
        await ws.send_str('40{"token":"agent"}')
        assert await ws.receive_str() == f'40{{"token":"agent"}}|pk123-{SESSION}'
        # Revoking the grant cuts the open socket (policy violation, 1008).
        redis = Redis.from_url(redis_url)
        try:
            await RedisGrants(redis).revoke(live)
        finally:
            await redis.aclose()
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert (msg.data if msg.type is WSMsgType.CLOSE else ws.close_code) == 1008
    assert openreplay.hits == [("GET", SOCKET)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as after:
        await gate.ws_connect(SOCKET, headers=bearer())
    assert after.value.status == 403


@pytest.mark.parametrize(("target", "status"), tricks_on("5/", "sessions", SESSION))
async def test_path_trick_never_reaches_openreplay(
    gate: TestClient, openreplay: FakeOpenReplay, target: str, status: int
) -> None:
    got, _ = await raw_request(gate, target)
    assert got == status
    assert openreplay.hits == []
