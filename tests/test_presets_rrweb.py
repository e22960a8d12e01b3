"""The generic rrweb preset end to end: jitgate with `preset: rrweb-generic` in front of a
fake rrweb app answering with rrweb event shapes (tests/fixtures/presets/rrweb-generic/)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, bearer
from redis.asyncio import Redis
from test_path_tricks import raw_request, tricks_on

from proxy.grantstore import RedisGrants

FIXTURES = ROOT / "tests" / "fixtures" / "presets" / "rrweb-generic"
REC = "rec-7"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class FakeApp:
    url: str = ""
    hits: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
async def app(aiohttp_server: Any) -> FakeApp:
    fake = FakeApp()

    async def handler(request: web.Request) -> web.Response:
        fake.hits.append((request.method, request.raw_path))
        rec = request.match_info.get("rec")
        if rec is None:
            return web.json_response(fixture("recording_list.json"))
        return web.json_response({**fixture("recording_events.json"), "id": rec})

    server_app = web.Application()
    for base in ("/api/recordings", "/api/sessions", "/api/replays"):
        server_app.router.add_route("*", base, handler)
        server_app.router.add_route("*", base + "/{rec}", handler)
        server_app.router.add_route("*", base + "/{rec}/{tail:.*}", handler)
    server_app.router.add_route("*", "/api/ingest", handler)
    server_app.router.add_route("*", "/replay/{rec}", handler)
    server_app.router.add_route("*", "/share/{rec}", handler)
    server = await aiohttp_server(server_app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gate(make_proxy: ProxyFactory, app: FakeApp) -> TestClient:
    policy = (ROOT / "config" / "presets" / "rrweb-generic.yaml").read_text()
    return await make_proxy(upstream_url=app.url, policy_text=policy)


async def grant(redis_url: str, scope: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        await RedisGrants(redis).add("alice", scope, 600, "preset test", "test")
    finally:
        await redis.aclose()


CONTENT = [f"/api/recordings/{REC}", f"/api/recordings/{REC}/events", f"/api/sessions/{REC}",
           f"/api/replays/{REC}/", f"/replay/{REC}"]  # fmt: skip


async def test_recordings_refused_without_a_grant(gate: TestClient, app: FakeApp) -> None:
    for path in CONTENT:
        resp = await gate.get(path, headers={**bearer(), "Accept": "application/json"})
        assert resp.status == 403, path
        assert (await resp.json())["scope"] == f"recording:{REC}"
    assert app.hits == []


@pytest.mark.parametrize("scope", [f"recording:{REC}", "recordings:all"])
async def test_recordings_served_under_a_grant(
    gate: TestClient, app: FakeApp, redis_url: str, scope: str
) -> None:
    await grant(redis_url, scope)
    for path in CONTENT:
        resp = await gate.get(path, headers=bearer())
        assert resp.status == 200, path
        body = await resp.json()
        assert body["id"] == REC and [e["type"] for e in body["events"]] == [4, 2, 3]
    assert len(app.hits) == len(CONTENT)
    other = await gate.get("/api/recordings/rec-8", headers=bearer())
    assert other.status == (200 if scope == "recordings:all" else 403)


async def test_lists_identity_only_and_share_export_blocked(
    gate: TestClient, app: FakeApp, redis_url: str
) -> None:
    resp = await gate.get("/api/recordings?page=1", headers=bearer())
    assert resp.status == 200 and await resp.json() == fixture("recording_list.json")
    anon = await gate.get("/api/recordings", headers={"Accept": "application/json"})
    assert anon.status == 401
    await grant(redis_url, "recordings:all")
    blocked = [
        ("POST", f"/api/recordings/{REC}/share"),
        ("GET", f"/api/recordings/{REC}/export?format=json"),
        ("GET", f"/api/sessions/{REC}/download"),
        ("GET", f"/share/{REC}"),
    ]
    for method, path in blocked:
        resp = await gate.request(method, path, headers=bearer())
        assert resp.status == 403, path
        assert (await resp.json())["error"] == "blocked"
    assert len(app.hits) == 1


async def test_the_policy_s_own_collector_is_public(gate: TestClient, app: FakeApp) -> None:
    resp = await gate.post(
        "/api/ingest", json={"events": fixture("recording_events.json")["events"]}
    )
    assert resp.status == 200
    assert app.hits == [("POST", "/api/ingest")]


@pytest.mark.parametrize(("target", "status"), tricks_on("", "recordings", REC))
async def test_path_trick_never_reaches_the_app(
    gate: TestClient, app: FakeApp, target: str, status: int
) -> None:
    got, _ = await raw_request(gate, target)
    assert got == status
    assert app.hits == []
