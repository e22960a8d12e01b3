"""The PostHog preset end to end: jitgate with `preset: posthog` in front of a fake PostHog.

The fake answers with PostHog's own response shapes (tests/fixtures/presets/posthog/,
README.md there says where each came from) on both URL families, and records what
reaches it. Grants are real, in the test session's Redis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, bearer
from redis.asyncio import Redis
from test_path_tricks import TRICKS, raw_request
from waiting import eventually

from proxy.grantstore import RedisGrants
from proxy.policyfile import compile_text

FIXTURES = ROOT / "tests" / "fixtures" / "presets" / "posthog"
FAMILIES = ("projects", "environments")
REC = "0192ab-c1"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class FakePostHog:
    url: str = ""
    hits: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
async def posthog(aiohttp_server: Any) -> FakePostHog:
    fake = FakePostHog()

    def seen(request: web.Request) -> None:
        fake.hits.append((request.method, request.raw_path))

    async def recording(request: web.Request) -> web.Response:
        seen(request)
        return web.json_response({**fixture("recording.json"), "id": request.match_info["rec"]})

    async def snapshots(request: web.Request) -> web.Response:
        seen(request)
        if request.query.get("source") == "blob_v2":
            body = (FIXTURES / "snapshot_block.jsonl").read_text()
            return web.Response(text=body, content_type="application/jsonl")
        return web.json_response(fixture("snapshot_sources.json"))

    def answer(name: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            seen(request)
            return web.json_response(fixture(name))

        return handler

    def answer_one(name: str, key: str, index: int) -> Any:
        async def handler(request: web.Request) -> web.Response:
            seen(request)
            return web.json_response(fixture(name)[key][index])

        return handler

    async def page(request: web.Request) -> web.Response:
        seen(request)  # a sharing viewer page would embed the shared recording
        return web.Response(text=f"<html>shared recording {REC}</html>", content_type="text/html")

    async def matching(request: web.Request) -> web.Response:
        seen(request)  # PostHog reads request.GET.dict(): the last session_ids given
        return web.json_response({"results": [f"event-of-{request.query['session_ids']}"]})

    app = web.Application()
    for fam in FAMILIES:
        base = f"/api/{fam}/{{team}}"
        app.router.add_get(f"{base}/session_recordings", answer("recording_list.json"))
        app.router.add_get(f"{base}/session_recordings/", answer("recording_list.json"))
        app.router.add_route(
            "*", f"{base}/session_recordings/{{rec}}/sharing", answer("sharing.json")
        )
        app.router.add_get(f"{base}/session_recordings/{{rec}}/snapshots", snapshots)
        app.router.add_get(f"{base}/session_recordings/matching_events", matching)
        app.router.add_get(f"{base}/session_recordings/{{rec}}", recording)
        app.router.add_get(
            f"{base}/session_recording_playlists/{{short}}/recordings",
            answer("playlist_recordings.json"),
        )
        app.router.add_route("*", f"{base}/query", answer("recording_list.json"))
        app.router.add_route("*", f"{base}/exports", answer("sharing.json"))
    app.router.add_get("/api/projects/{team}/comments", answer("comments.json"))
    app.router.add_get(
        "/api/projects/{team}/comments/{id}", answer_one("comments.json", "results", 0)
    )
    for collector in ("/e/", "/s/", "/i/v0/e/", "/batch/", "/flags/", "/decide/"):
        app.router.add_route("*", collector, answer("capture_ok.json"))
    for viewer in ("/shared/{token}", "/embedded/{token}", "/exporter"):
        app.router.add_get(viewer, page)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gate(make_proxy: ProxyFactory, posthog: FakePostHog) -> TestClient:
    return await make_proxy(upstream_url=posthog.url, policy_text="preset: posthog\n")


async def grant(redis_url: str, scope: str, user: str = "alice") -> str:
    redis = Redis.from_url(redis_url)
    try:
        return (await RedisGrants(redis).add(user, scope, 600, "preset test", "test")).id
    finally:
        await redis.aclose()


async def revoke(redis_url: str, grant_id: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        await RedisGrants(redis).revoke(grant_id, "test")
    finally:
        await redis.aclose()


def content_paths(fam: str, rec: str = REC) -> list[str]:
    base = f"/api/{fam}/2/session_recordings/{rec}"
    return [
        base,
        f"{base}/",
        f"{base}/snapshots",
        f"{base}/snapshots?source=blob_v2&start_blob_key=0&end_blob_key=0",
    ]


# --- protected content ---------------------------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES)
async def test_content_refused_without_a_grant(
    gate: TestClient, posthog: FakePostHog, fam: str
) -> None:
    for path in content_paths(fam):
        resp = await gate.get(path, headers={**bearer(), "Accept": "application/json"})
        assert resp.status == 403, path
        assert (await resp.json())["scope"] == f"recording:2/{REC}"
        anon = await gate.get(path, headers={"Accept": "application/json"})
        assert anon.status == 401, path
    assert posthog.hits == []


@pytest.mark.parametrize("scope", [f"recording:2/{REC}", "project:2"])
async def test_one_grant_serves_both_url_families(
    gate: TestClient, posthog: FakePostHog, redis_url: str, scope: str
) -> None:
    await grant(redis_url, scope)
    for fam in FAMILIES:
        base = f"/api/{fam}/2/session_recordings/{REC}"
        resp = await gate.get(base, headers=bearer())
        assert resp.status == 200
        assert await resp.json() == {**fixture("recording.json"), "id": REC}
        resp = await gate.get(f"{base}/snapshots", headers=bearer())
        assert await resp.json() == fixture("snapshot_sources.json")
        resp = await gate.get(f"{base}/snapshots?source=blob_v2&blob_key=0", headers=bearer())
        assert resp.status == 200
        lines = (await resp.text()).splitlines()
        assert [json.loads(line)[1]["type"] for line in lines] == [4, 2, 3]
    assert len(posthog.hits) == 6


async def test_a_grant_opens_only_its_recording_and_team(
    gate: TestClient, posthog: FakePostHog, redis_url: str
) -> None:
    await grant(redis_url, f"recording:2/{REC}")
    await grant(redis_url, "project:3")
    for path in (
        "/api/environments/2/session_recordings/0192ab-c2",
        f"/api/projects/4/session_recordings/{REC}",
    ):
        assert (await gate.get(path, headers=bearer())).status == 403
    other = await gate.get(f"/api/projects/2/session_recordings/{REC}", headers=bearer("bob"))
    assert other.status == 403
    assert posthog.hits == []


# --- identity-only lists ------------------------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES)
async def test_lists_need_only_an_identity(
    gate: TestClient, posthog: FakePostHog, fam: str
) -> None:
    for path in (f"/api/{fam}/2/session_recordings", f"/api/{fam}/2/session_recordings/"):
        resp = await gate.get(path, headers=bearer())
        assert resp.status == 200
        assert await resp.json() == fixture("recording_list.json")
    playlist = f"/api/{fam}/2/session_recording_playlists/abcd1234/recordings"
    resp = await gate.get(playlist, headers=bearer())
    assert await resp.json() == fixture("playlist_recordings.json")
    anon = await gate.get(
        f"/api/{fam}/2/session_recordings", headers={"Accept": "application/json"}
    )
    assert anon.status == 401
    assert len(posthog.hits) == 3


# --- blocked share, export and query routes -------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES)
async def test_share_export_and_query_blocked_even_with_a_project_grant(
    gate: TestClient, posthog: FakePostHog, redis_url: str, fam: str
) -> None:
    await grant(redis_url, "project:2")
    blocked = [
        ("GET", f"/api/{fam}/2/session_recordings/{REC}/sharing"),
        ("PATCH", f"/api/{fam}/2/session_recordings/{REC}/sharing"),
        ("POST", f"/api/{fam}/2/session_recordings/{REC}/sharing/passwords"),
        ("POST", f"/api/{fam}/2/exports"),
        ("GET", f"/api/{fam}/2/exports/9"),
        ("POST", f"/api/{fam}/2/query"),
        ("POST", f"/api/{fam}/2/query/"),
        ("GET", f"/api/{fam}/@current/session_recordings/{REC}/snapshots"),
        ("GET", f"/api/{fam}/%40current/session_recordings/{REC}"),
    ]
    for method, path in blocked:
        resp = await gate.request(method, path, headers=bearer(), json={"enabled": True})
        assert resp.status == 403, (method, path)
        assert (await resp.json())["error"] == "blocked", path
    assert posthog.hits == []


async def test_sharing_viewer_pages_blocked_for_everyone(
    gate: TestClient, posthog: FakePostHog
) -> None:
    for path in ("/shared/Ak3wZq9", "/embedded/Ak3wZq9", "/exporter?token=Ak3wZq9"):
        for headers in ({}, bearer()):
            resp = await gate.get(path, headers={**headers, "Accept": "application/json"})
            assert resp.status == 403, path
    assert posthog.hits == []


# --- public collectors ---------------------------------------------------------------------


async def test_collectors_are_public(gate: TestClient, posthog: FakePostHog) -> None:
    for path in (
        "/e/",
        "/s/?compression=gzip-js",
        "/i/v0/e/",
        "/batch/",
        "/flags/?v=2",
        "/decide/",
    ):
        resp = await gate.post(path, data=b'{"api_key": "phc_test"}')
        assert resp.status == 200, path
        assert await resp.json() == {"status": 1}
    assert [p for _, p in posthog.hits][:2] == ["/e/", "/s/?compression=gzip-js"]
    assert len(posthog.hits) == 6


# --- path variants against the preset's routes -----------------------------------------------


def preset_tricks() -> list[tuple[str, int]]:
    """The path-trick corpus, moved onto both PostHog URL families."""
    out = []
    for target, status in TRICKS:
        for fam in FAMILIES:
            out.append((target.replace("/projects/", f"/{fam}/").replace("demo-1", REC), status))
    return out


@pytest.mark.parametrize(("target", "status"), preset_tricks())
async def test_path_trick_never_reaches_posthog(
    gate: TestClient, posthog: FakePostHog, target: str, status: int
) -> None:
    got, _ = await raw_request(gate, target)
    assert got == status
    assert posthog.hits == []


async def test_path_variants_are_decided_on_the_forwarded_path(
    gate: TestClient, posthog: FakePostHog, redis_url: str
) -> None:
    await grant(redis_url, f"recording:1/{REC}")
    target = "/static/%2e%2e/api/environments/1/session_recordings/%30192ab-c1//snapshots"
    got, _ = await raw_request(gate, target)
    assert got == 200
    assert posthog.hits == [("GET", f"/api/environments/1/session_recordings/{REC}/snapshots")]


def test_fixture_provenance_is_written_down() -> None:
    readme = (FIXTURES / "README.md").read_text()
    for name in sorted(p.name for p in Path(FIXTURES).iterdir() if p.name != "README.md"):
        assert f"`{name}`" in readme, name


# --- matching_events: the session is named in the query string ----------------------------


@pytest.mark.parametrize("fam", FAMILIES)
async def test_matching_events_needs_the_named_sessions_grant(
    gate: TestClient, posthog: FakePostHog, redis_url: str, fam: str
) -> None:
    base = f"/api/{fam}/2/session_recordings/matching_events"
    mine = f'{base}?session_ids=["{REC}"]&events=[]'
    other = f'{base}?session_ids=["0192ab-c2"]&events=[]'
    assert (await gate.get(mine, headers=bearer())).status == 403
    grant_id = await grant(redis_url, f"recording:2/{REC}")
    resp = await gate.get(mine, headers=bearer())
    assert resp.status == 200
    assert await resp.json() == {"results": [f'event-of-["{REC}"]']}
    assert (await gate.get(other, headers=bearer())).status == 403
    # PostHog would act on the last of two: neither is chosen, the request is refused.
    twice = f'{base}?session_ids=["{REC}"]&session_ids=["0192ab-c2"]'
    assert (await gate.get(twice, headers=bearer())).status == 400
    assert (await gate.get(f"{base}?events=[]", headers=bearer())).status == 400
    assert len(posthog.hits) == 1  # only the granted request reached PostHog
    await revoke(redis_url, grant_id)

    async def refused() -> bool:  # the revocation reaches the gate's grant view at once
        return (await gate.get(mine, headers=bearer())).status == 403

    await eventually(refused, within=5, what="the revoked grant to stop opening it")


async def test_comments_on_a_recording_are_locked_without_its_grant(
    gate: TestClient, redis_url: str
) -> None:
    comments = fixture("comments.json")
    on_recording, on_insight = comments["results"]
    scope = f"recording:2/{REC}"
    marker = {"locked": True, "scope": scope, "request_url": f"/_jit/request?scope={scope}"}
    dropped = ("content", "rich_content", "item_context")  # what it says about the recording
    locked = {k: v for k, v in on_recording.items() if k not in dropped}
    locked["item_id"] = {"jitgate": marker}

    async def get(path: str) -> Any:
        resp = await gate.get(path, headers=bearer())
        assert resp.status == 200
        return await resp.json()

    one = f"/api/projects/2/comments/{on_recording['id']}"
    assert (await get("/api/projects/2/comments"))["results"] == [locked, on_insight]
    assert await get(one) == locked
    grant_id = await grant(redis_url, "project:2")
    assert await get("/api/projects/2/comments") == comments
    assert await get(one) == on_recording
    await revoke(redis_url, grant_id)

    async def relocked() -> bool:
        return bool((await get("/api/projects/2/comments"))["results"] == [locked, on_insight])

    await eventually(relocked, within=5, what="the revoked grant to lock the comment again")


# --- the query API: decided on the body's kind -----------------------------------------

# The kinds that reach recording data (PostHog's NodeKind, frontend/src/queries/schema/
# schema-general.ts), each blocked by a named route, and kinds the table does not name.
RECORDING_KINDS = {
    "HogQLQuery": {"query": "select * from session_replay_events"},
    "HogQLASTQuery": {"query": {}},
    "HogQuery": {"code": "return 1"},
    "SessionsTimelineQuery": {"after": "-24h"},
    "RecordingsQuery": {"date_from": "-3d"},
    "SessionBatchEventsQuery": {"session_ids": [REC]},
    "EventsQuery": {"select": ["*"], "where": [f"$session_id = '{REC}'"]},
}


@pytest.mark.parametrize("fam", FAMILIES)
async def test_query_kinds_with_recording_data_are_blocked(
    gate: TestClient, posthog: FakePostHog, redis_url: str, fam: str
) -> None:
    await grant(redis_url, "project:2")
    suffix = "-env" if fam == "environments" else ""
    for kind, rest in RECORDING_KINDS.items():
        body = {"query": {"kind": kind, **rest}}
        resp = await gate.post(f"/api/{fam}/2/query", json=body, headers=bearer())
        assert resp.status == 403 and (await resp.json())["error"] == "blocked", kind
    for kind in ("TrendsQuery", "SomeNewQuery"):  # not named: blocked by default
        resp = await gate.post(
            f"/api/{fam}/2/query", json={"query": {"kind": kind}}, headers=bearer()
        )
        assert resp.status == 403, kind
    resp = await gate.post(f"/api/{fam}/2/query", data=b"{not json", headers=bearer())
    assert resp.status == 400
    assert posthog.hits == []
    policy = compile_text("preset: posthog\n", "p.yaml")
    for kind in RECORDING_KINDS:
        match = policy.match_body(
            policy.match("POST", f"/api/{fam}/2/query"),
            json.dumps({"query": {"kind": kind}}).encode(),
        )
        assert match.route.startswith("posthog.query-") and match.route.endswith(suffix), kind
        assert match.note is None, kind  # blocked by its own route, which says why


async def test_a_reviewed_kind_is_opened_by_an_own_route(
    make_proxy: ProxyFactory, posthog: FakePostHog
) -> None:
    text = (
        "preset: posthog\nroutes:\n  - id: trends\n    methods: [POST]\n"
        "    path: /api/projects/{project}/query\n"
        "    body: {json: {query.kind: TrendsQuery}}\n    access: identity\n"
    )
    gate = await make_proxy(upstream_url=posthog.url, policy_text=text)
    trends = {"query": {"kind": "TrendsQuery", "series": []}}
    resp = await gate.post("/api/projects/2/query", json=trends, headers=bearer())
    assert resp.status == 200
    hogql = {"query": {"kind": "HogQLQuery", "query": "select 1"}}
    resp = await gate.post("/api/projects/2/query", json=hogql, headers=bearer())
    assert resp.status == 403
    assert posthog.hits == [("POST", "/api/projects/2/query")]


def test_snapshot_lines_are_posthogs_blob_v2_lines() -> None:
    """Each line of a blob_v2 answer is `[window_id, event]`, which PostHog's player turns
    into {windowId, data: [event]} (processSnapshotLine in snapshot-parsing-utils.ts)."""
    lines = (FIXTURES / "snapshot_block.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        window_id, event = json.loads(line)
        assert isinstance(window_id, str) and window_id
        assert isinstance(event["type"], int) and isinstance(event["timestamp"], int)
        assert isinstance(event["data"], dict)
