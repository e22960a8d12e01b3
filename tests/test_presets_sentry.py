"""The Sentry preset end to end: jitgate with `preset: sentry` in front of a fake Sentry
answering with Sentry's response shapes (tests/fixtures/presets/sentry/, README.md there
says where each came from)."""

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

FIXTURES = ROOT / "tests" / "fixtures" / "presets" / "sentry"
REPLAY = "9f1c0d2e8a7b4c3d9e8f7a6b5c4d3e2f"
PROJECT = f"/api/0/projects/acme/web/replays/{REPLAY}"
ORG = f"/api/0/organizations/acme/replays/{REPLAY}"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class FakeSentry:
    url: str = ""
    hits: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
async def sentry(aiohttp_server: Any) -> FakeSentry:
    fake = FakeSentry()

    def answer(name: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            fake.hits.append((request.method, request.raw_path))
            return web.json_response(fixture(name))

        return handler

    app = web.Application()
    bases = ("/api/0/projects/{org}/{project}/replays/{replay}",
             "/api/0/organizations/{org}/replays/{replay}")  # fmt: skip
    for base in bases:
        app.router.add_get(base + "/", answer("replay.json"))
        app.router.add_get(base + "/recording-segments/", answer("recording_segments.json"))
        app.router.add_get(
            base + "/recording-segments/{segment}/", answer("recording_segments.json")
        )
    app.router.add_get("/api/0/organizations/{org}/replays/", answer("replay_list.json"))
    app.router.add_route("*", "/api/0/shared/issues/{share}/", answer("replay.json"))
    app.router.add_route("*", "/api/0/organizations/{org}/data-export/", answer("replay.json"))
    app.router.add_post("/api/{project_id}/envelope/", answer("envelope_ok.json"))
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gate(make_proxy: ProxyFactory, sentry: FakeSentry) -> TestClient:
    return await make_proxy(upstream_url=sentry.url, policy_text="preset: sentry\n")


async def grant(redis_url: str, scope: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        await RedisGrants(redis).add("alice", scope, 600, "preset test", "test")
    finally:
        await redis.aclose()


CONTENT = [f"{PROJECT}/", f"{PROJECT}/recording-segments/?download=true",
           f"{PROJECT}/recording-segments/0/", f"{ORG}/"]  # fmt: skip


async def test_replays_refused_without_a_grant(gate: TestClient, sentry: FakeSentry) -> None:
    for path in CONTENT:
        resp = await gate.get(path, headers={**bearer(), "Accept": "application/json"})
        assert resp.status == 403, path
        assert (await resp.json())["scope"] == f"replay:acme/{REPLAY}"
        assert (await gate.get(path, headers={"Accept": "application/json"})).status == 401
    assert sentry.hits == []


@pytest.mark.parametrize("scope", [f"replay:acme/{REPLAY}", "org:acme"])
async def test_replays_served_under_a_grant(
    gate: TestClient, sentry: FakeSentry, redis_url: str, scope: str
) -> None:
    await grant(redis_url, scope)
    for path in CONTENT:
        resp = await gate.get(path, headers=bearer())
        assert resp.status == 200, path
        body = await resp.json()
        if "recording-segments" in path:
            assert [[e["type"] for e in seg] for seg in body] == [[4, 2], [3, 5]]
        else:
            assert body["data"]["id"] == REPLAY
    assert len(sentry.hits) == len(CONTENT)
    other = await gate.get("/api/0/organizations/other/replays/abc/", headers=bearer())
    assert other.status == 403


async def test_list_identity_only_shares_and_exports_blocked(
    gate: TestClient, sentry: FakeSentry, redis_url: str
) -> None:
    resp = await gate.get("/api/0/organizations/acme/replays/", headers=bearer())
    assert resp.status == 200 and await resp.json() == fixture("replay_list.json")
    await grant(redis_url, "org:acme")
    for method, path in [("GET", "/api/0/shared/issues/5f1e/"),
                         ("POST", "/api/0/organizations/acme/data-export/")]:  # fmt: skip
        resp = await gate.request(method, path, headers=bearer())
        assert resp.status == 403 and (await resp.json())["error"] == "blocked"
    assert len(sentry.hits) == 1


async def test_envelope_collector_is_public(gate: TestClient, sentry: FakeSentry) -> None:
    envelope = b'{"event_id":"2b3c"}\n{"type":"replay_recording","length":2}\n{}\n'
    resp = await gate.post("/api/4505/envelope/?sentry_key=abc", data=envelope)
    assert resp.status == 200 and await resp.json() == fixture("envelope_ok.json")
    assert sentry.hits == [("POST", "/api/4505/envelope/?sentry_key=abc")]


@pytest.mark.parametrize(("target", "status"), tricks_on("0/projects/acme/web/", "replays", REPLAY))
async def test_path_trick_never_reaches_sentry(
    gate: TestClient, sentry: FakeSentry, target: str, status: int
) -> None:
    got, _ = await raw_request(gate, target)
    assert got == status
    assert sentry.hits == []
