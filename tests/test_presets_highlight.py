"""The Highlight preset end to end: jitgate with `preset: highlight` in front of a fake
Highlight whose GraphQL endpoints (/private, /public) answer with Highlight's response
shapes (tests/fixtures/presets/highlight/, README.md there says where each came from),
real Redis grants, and the bodies checked byte for byte at the upstream."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, bearer
from redis.asyncio import Redis
from storagekit import Storage

from proxy.grantstore import RedisGrants

FIXTURES = ROOT / "tests" / "fixtures" / "presets" / "highlight"
SESSION = "Fk3xQ9pZr2mN7vB1cT8wY5hJ0aLd"
OTHER = "Qm8bT1vX4kP0sR6nW2yZ9cH3jL5e"
SCOPE = f"session:{SESSION}"
S3 = "https://s3.example.invalid"
JSON = {"Content-Type": "application/json", "Accept": "application/json"}

# Documents as Highlight's app and SDK send them (frontend/src/graph/operators/query.gql,
# mutation.gql; sdk/highlight-run/.../mutation.gql), their selections shortened.
GET_SESSION = "query GetSession($secure_id: String!) { session(secure_id: $secure_id) { secure_id identifier direct_download_url resources_url __typename } }"  # noqa: E501
GET_PAYLOAD = "query GetSessionPayload($session_secure_id: String!, $skip_events: Boolean!) { events(session_secure_id: $session_secure_id) @skip(if: $skip_events) errors(session_secure_id: $session_secure_id) { id event } rage_clicks(session_secure_id: $session_secure_id) { total_clicks } session_comments(session_secure_id: $session_secure_id) { id text } }"  # noqa: E501
GET_INTERVALS = "query GetSessionIntervals($session_secure_id: String!) { session_intervals(session_secure_id: $session_secure_id) { start_time end_time active duration } }"  # noqa: E501
GET_CHUNK_URL = "query GetEventChunkURL($secure_id: String!, $index: Int!) { event_chunk_url(secure_id: $secure_id, index: $index) }"  # noqa: E501
GET_RESOURCES = "query GetResources($session_secure_id: String!) { resources(session_secure_id: $session_secure_id) }"  # noqa: E501
GET_SESSIONS = "query GetSessions($project_id: ID!, $count: Int!, $params: QueryInput!, $sort_desc: Boolean!, $page: Int) { sessions(project_id: $project_id, count: $count, params: $params, sort_desc: $sort_desc, page: $page) { sessions { id secure_id identifier } totalCount } }"  # noqa: E501
EXPORT = "mutation ExportSession($session_secure_id: String!) { exportSession(session_secure_id: $session_secure_id) }"  # noqa: E501
SHARE = "mutation UpdateSessionIsPublic($session_secure_id: String!, $is_public: Boolean!) { updateSessionIsPublic(session_secure_id: $session_secure_id, is_public: $is_public) { secure_id is_public } }"  # noqa: E501
ADMINS = "query GetWorkspaceAdmins($workspace_id: ID!) { admins: workspace_admins(workspace_id: $workspace_id) { role } }"  # noqa: E501
INITIALIZE = "mutation initializeSession($session_secure_id: String!, $organization_verbose_id: String!, $enable_strict_privacy: Boolean!, $enable_recording_network_contents: Boolean!, $clientVersion: String!, $firstloadVersion: String!, $clientConfig: String!, $environment: String!, $fingerprint: String!, $client_id: String!) { initializeSession(session_secure_id: $session_secure_id, organization_verbose_id: $organization_verbose_id, enable_strict_privacy: $enable_strict_privacy, enable_recording_network_contents: $enable_recording_network_contents, clientVersion: $clientVersion, firstloadVersion: $firstloadVersion, clientConfig: $clientConfig, environment: $environment, fingerprint: $fingerprint, client_id: $client_id) { secure_id project_id } }"  # noqa: E501
PUSH = "mutation PushPayload($session_secure_id: String!, $payload_id: ID, $events: ReplayEventsInput!, $messages: String!, $resources: String!, $errors: [ErrorObjectInput]!) { pushPayload(session_secure_id: $session_secure_id, payload_id: $payload_id, events: $events, messages: $messages, resources: $resources, errors: $errors) }"  # noqa: E501

ANSWERS = {  # operation -> fixture, as the fake Highlight answers it
    "GetSession": "session.json",
    "GetSessionPayload": "session_payload.json",
    "GetSessions": "sessions.json",
    "GetEventChunkURL": "event_chunk_url.json",
    "initializeSession": "initialize.json",
}


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def gql(operation: str, query: str, **variables: Any) -> bytes:
    return json.dumps({"operationName": operation, "variables": variables, "query": query}).encode()


@dataclass
class FakeHighlight:
    url: str = ""
    bodies: list[tuple[str, bytes]] = field(default_factory=list)


@pytest.fixture
async def highlight(aiohttp_server: Any, storage: Storage) -> FakeHighlight:
    fake = FakeHighlight()

    async def graph(request: web.Request) -> web.Response:
        body = await request.read()
        fake.bodies.append((request.path, body))
        name = json.loads(body).get("operationName")
        if name in ANSWERS:  # the fixtures' made-up S3 host: a real local one instead
            return web.json_response(storage.presign_all(fixture(ANSWERS[name]), S3))
        if name == "PushPayload":
            return web.json_response({"data": {"pushPayload": 3}})
        return web.json_response({"data": {}})  # other operations: an empty data object

    app = web.Application()
    app.router.add_post("/private", graph)
    app.router.add_post("/public", graph)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gate(make_proxy: ProxyFactory, highlight: FakeHighlight, storage: Storage) -> TestClient:
    return await make_proxy(
        upstream_url=highlight.url, policy_text="preset: highlight\n", extra=storage.config()
    )


@pytest.fixture
async def grants(redis_url: str) -> Any:
    redis = Redis.from_url(redis_url)
    yield RedisGrants(redis)
    await redis.aclose()


async def post(gate: TestClient, path: str, body: bytes, user: str | None = "alice") -> Any:
    auth = bearer(user) if user else {}
    return await gate.post(path, data=body, headers={**auth, **JSON})


CONTENT = [
    # Odd spacing and key order: the upstream must get these bytes, not a re-serialised copy.
    b'{ "variables" :{"secure_id":"' + SESSION.encode() + b'"},\n "operationName":"GetSession",'
    b' "query": ' + json.dumps(GET_SESSION).encode() + b"}",
    gql("GetSessionPayload", GET_PAYLOAD, session_secure_id=SESSION, skip_events=False),
    gql("GetSessionIntervals", GET_INTERVALS, session_secure_id=SESSION),
    gql("GetResources", GET_RESOURCES, session_secure_id=SESSION),
]


async def test_session_content_needs_the_sessions_grant(
    gate: TestClient, highlight: FakeHighlight, grants: RedisGrants
) -> None:
    for body in CONTENT:
        refused = await post(gate, "/private", body)
        assert refused.status == 403, body
        assert (await refused.json())["scope"] == SCOPE
        assert (await post(gate, "/private", body, user=None)).status == 401
    assert highlight.bodies == []

    g = await grants.add("alice", SCOPE, 600, "preset test", "test")
    for body in CONTENT:
        ok = await post(gate, "/private", body)
        assert ok.status == 200, body
    # Forwarded exactly as sent, and answered with Highlight's shapes.
    assert highlight.bodies == [("/private", body) for body in CONTENT]
    session = (await (await post(gate, "/private", CONTENT[0])).json())["data"]["session"]
    assert session["secure_id"] == SESSION
    assert session["direct_download_url"].startswith("/_jit/blob/")
    payload = (await (await post(gate, "/private", CONTENT[1])).json())["data"]
    assert [e["type"] for e in payload["events"]] == [4, 2, 3]

    # The grant is for that session only.
    other = gql("GetSession", GET_SESSION, secure_id=OTHER)
    refused = await post(gate, "/private", other)
    assert refused.status == 403 and (await refused.json())["scope"] == f"session:{OTHER}"

    await grants.revoke(g.id, "test")
    sent = len(highlight.bodies)
    for body in CONTENT:
        assert (await post(gate, "/private", body)).status == 403
    assert len(highlight.bodies) == sent


async def test_recording_files_open_by_grant_bound_blob_urls(
    gate: TestClient, grants: RedisGrants, storage: Storage
) -> None:
    g = await grants.add("alice", SCOPE, 600, "preset test", "test")
    answer = await post(gate, "/private", CONTENT[0])
    text = await answer.text()
    assert S3 not in text and storage.url not in text and "X-Amz-" not in text
    session = json.loads(text)["data"]["session"]
    urls = [session[k] for k in ("direct_download_url", "resources_url")]
    assert session["web_socket_events_url"] is None
    chunk = gql("GetEventChunkURL", GET_CHUNK_URL, secure_id=SESSION, index=0)
    urls.append((await (await post(gate, "/private", chunk)).json())["data"]["event_chunk_url"])
    assert all(u.startswith("/_jit/blob/") for u in urls)
    for url, name in zip(
        urls, ("contents-compressed", "resources-compressed", "0000"), strict=True
    ):
        got = await gate.get(url, headers=bearer())
        assert got.status == 200 and name in (await got.read()).decode()
    assert (await gate.get(urls[0], headers=bearer("bob"))).status == 403
    await grants.revoke(g.id, "test")
    assert (await gate.get(urls[0], headers=bearer())).status == 403
    assert len(storage.hits) == 3


async def test_lists_are_identity_only(gate: TestClient, highlight: FakeHighlight) -> None:
    body = gql("GetSessions", GET_SESSIONS, project_id="1", count=10, sort_desc=True, page=1,
               params={"query": "browser_name=Chrome", "date_range": None})  # fmt: skip
    assert (await post(gate, "/private", body, user=None)).status == 401
    ok = await post(gate, "/private", body)
    assert ok.status == 200
    listed = (await ok.json())["data"]["sessions"]["sessions"]
    assert [s["secure_id"] for s in listed] == [SESSION, OTHER]
    assert highlight.bodies == [("/private", body)]


@pytest.mark.parametrize("mode", ["annotate", "filter"])
async def test_the_sessions_list_shows_what_the_caller_may_open(
    make_proxy: ProxyFactory, highlight: FakeHighlight, grants: RedisGrants, mode: str
) -> None:
    text = f"preset: highlight\nlists: {mode}\n"
    gate = await make_proxy(upstream_url=highlight.url, policy_text=text)
    body = gql("GetSessions", GET_SESSIONS, project_id="1", count=10, sort_desc=True, page=1,
               params={"query": "", "date_range": None})  # fmt: skip
    sessions = fixture("sessions.json")["data"]["sessions"]

    async def listed() -> list[Any]:
        ok = await post(gate, "/private", body)
        assert ok.status == 200
        got = (await ok.json())["data"]["sessions"]
        assert got["totalCount"] == sessions["totalCount"]  # the rest of the answer stays
        return list(got["sessions"])

    def locked(session: dict[str, Any]) -> dict[str, Any]:
        scope = f"session:{session['secure_id']}"
        url = f"/_jit/request?scope={scope}"
        return {**session, "jitgate": {"locked": True, "scope": scope, "request_url": url}}

    first, second = sessions["sessions"]
    closed = [locked(first), locked(second)] if mode == "annotate" else []
    assert await listed() == closed
    grant = await grants.add("alice", f"session:{second['secure_id']}", 600, "test", "test")
    opened = [locked(first), second] if mode == "annotate" else [second]
    assert await listed() == opened
    await grants.revoke(grant.id, "test")
    assert await listed() == closed
    assert all(sent == ("/private", body) for sent in highlight.bodies)  # forwarded as sent


async def test_unknown_share_and_export_operations_are_blocked(
    gate: TestClient, highlight: FakeHighlight, grants: RedisGrants
) -> None:
    await grants.add("alice", SCOPE, 600, "preset test", "test")
    for body in (
        gql("GetWorkspaceAdmins", ADMINS, workspace_id="1"),  # named by no rule
        gql("ExportSession", EXPORT, session_secure_id=SESSION),
        gql("UpdateSessionIsPublic", SHARE, session_secure_id=SESSION, is_public=True),
    ):
        resp = await post(gate, "/private", body)
        assert resp.status == 403, body
        assert (await resp.json())["error"] == "blocked"
    # GraphQL over GET (and the subscription's WebSocket upgrade) has no body to decide on.
    assert (await gate.get(f"/private?query={{session(secure_id:%22{SESSION}%22){{secure_id}}}}",
                           headers=bearer())).status == 403  # fmt: skip
    assert highlight.bodies == []


LIES = {
    # An operation named as a list, selecting one session's content.
    "list-name-content-field": gql(
        "GetSessions", GET_SESSION.replace("GetSession(", "GetSessions("), secure_id=SESSION
    ),
    # The session operation with another root field under the allowed one's alias.
    "alias": gql(
        "GetSession",
        "query GetSession($secure_id: String!) {"
        " session: resources(session_secure_id: $secure_id) }",
        secure_id=SESSION,
    ),
    # A second root field beside the allowed one.
    "extra-root": gql(
        "GetSessionIntervals",
        "query GetSessionIntervals($session_secure_id: String!) {"
        " session_intervals(session_secure_id: $session_secure_id) { active }"
        " events(session_secure_id: $session_secure_id) }",
        session_secure_id=SESSION,
    ),
    # A literal naming another session than the bound variable.
    "literal": gql(
        "GetSession",
        "query GetSession($secure_id: String!) {"
        f' session(secure_id: "{OTHER}") {{ secure_id }} }}',
        secure_id=SESSION,
    ),
}


@pytest.mark.parametrize("body", LIES.values(), ids=LIES.keys())
async def test_an_operation_lying_about_its_fields_is_refused(
    gate: TestClient, highlight: FakeHighlight, grants: RedisGrants, body: bytes
) -> None:
    await grants.add("alice", SCOPE, 600, "preset test", "test")
    resp = await post(gate, "/private", body)
    assert resp.status == 400, await resp.text()
    assert highlight.bodies == []


async def test_sdk_ingestion_is_public_and_only_that(
    gate: TestClient, highlight: FakeHighlight
) -> None:
    init = gql("initializeSession", INITIALIZE, session_secure_id="Nw2pR7tY0uI3oP6aS9dF1gH4jK8l",
               organization_verbose_id="1", enable_strict_privacy=False,
               enable_recording_network_contents=False, clientVersion="9.0.0",
               firstloadVersion="9.0.0", clientConfig="{}", environment="production",
               fingerprint="f1", client_id="c1")  # fmt: skip
    push = gql("PushPayload", PUSH, session_secure_id="Nw2pR7tY0uI3oP6aS9dF1gH4jK8l",
               payload_id="1", events={"events": []}, messages="[]", resources="[]",
               errors=[])  # fmt: skip
    ok = await post(gate, "/public", init, user=None)
    assert ok.status == 200
    assert (await ok.json())["data"]["initializeSession"]["project_id"] == "1"
    assert (await post(gate, "/public", push, user=None)).status == 200
    assert highlight.bodies == [("/public", init), ("/public", push)]
    # A private operation sent to the public graph is not ingestion.
    for user in (None, "alice"):
        refused = await post(gate, "/public", CONTENT[0], user=user)
        assert refused.status == 403
    assert len(highlight.bodies) == 2


def test_fixture_provenance_is_written_down() -> None:
    readme = (FIXTURES / "README.md").read_text()
    assert "5099514e6288713fcdf2b1911cf2ff6c324867fa" in readme
    for path in sorted(FIXTURES.iterdir()):
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name


def test_explain_names_the_preset_operation(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("preset: highlight\n")
    jitgate = str(Path(sys.executable).parent / "jitgate")
    body = gql("GetResources", GET_RESOURCES, session_secure_id=SESSION).decode()
    out = subprocess.run(
        [jitgate, "policy", "explain", "--no-redis", "--json", "--user", "alice",
         "POST", "/private", "--json-body", body],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin", "JITGATE_POLICY__FILE": str(policy)},
    )  # fmt: skip
    got = json.loads(out.stdout)
    assert (got["route"], got["preset"], got["scope"]) == (
        "highlight.session-resources",
        "highlight",
        SCOPE,
    )
    assert (
        "backend/private-graph/graph/schema.graphqls@5099514e"
        in (got["policy"]["preset"]["sources"])
    )
