"""JSON and GraphQL body rules end to end: jitgate, real Redis, an upstream echoing the body.

The rule decides on the body jitgate holds, and the upstream receives exactly those bytes;
what cannot be decided (GraphQL tricks, malformed JSON, oversize bodies) never reaches it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, bearer
from redis.asyncio import Redis

from proxy.errors import ConfigErrors
from proxy.grantstore import RedisGrants
from proxy.policyfile import compile_text

POLICY = """
version: 1
default: identity
routes:
  - id: gql-session
    methods: [POST]
    path: /private
    body:
      graphql:
        operation: GetSession
        fields: [session]
        variables: {session_secure_id: "{recording}"}
    scope: "recording:{recording}"
  - id: gql-sessions
    methods: [POST]
    path: /private
    body: {graphql: {operation: GetSessions, fields: [sessions]}}
    access: identity
  - id: replay-query
    methods: [POST]
    path: /api/{project}/query
    body: {json: {query.kind: SessionsQuery, query.session_id: "{recording}"}}
    scope: "recording:{recording}"
  - id: list-query
    methods: [POST]
    path: /api/{project}/query
    body: {json: {query.kind: SessionsListQuery}}
    access: identity
  - id: query-fallback
    path: /api/{project}/query
    access: identity
"""

GET_SESSION = (
    "query GetSession($session_secure_id: String!) {"
    " session(secure_id: $session_secure_id) { secure_id } }"
)
JSON = {"Accept": "application/json", "Content-Type": "application/json"}


@dataclass
class Echo:
    url: str = ""
    bodies: list[bytes] = field(default_factory=list)


@pytest.fixture
async def echo(aiohttp_server: Any) -> Echo:
    up = Echo()

    async def anything(request: web.Request) -> web.Response:
        body = await request.read()
        up.bodies.append(body)
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)
    up.url = str(server.make_url("")).rstrip("/")
    return up


@pytest.fixture
async def gate(make_proxy: ProxyFactory, echo: Echo) -> TestClient:
    return await make_proxy(
        upstream_url=echo.url, policy_text=POLICY, extra="forward: {max_body_bytes: 4096}"
    )


@pytest.fixture
async def grants(redis_url: str) -> Any:
    redis = Redis.from_url(redis_url)
    yield RedisGrants(redis)
    await redis.aclose()


def gql(operation: str | None, query: str, **variables: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"query": query, "variables": variables}
    if operation is not None:
        body["operationName"] = operation
    return body


async def post(gate: TestClient, path: str, body: bytes, user: str = "alice") -> Any:
    return await gate.post(path, data=body, headers={**bearer(user), **JSON})


async def test_graphql_operation_needs_the_grant_of_its_variable_and_is_forwarded_as_sent(
    gate: TestClient, echo: Echo, grants: RedisGrants
) -> None:
    # Odd spacing and key order: the upstream gets these bytes, not a re-serialised copy.
    body = (
        b'{ "variables" : {"session_secure_id":"s-1"},\n "operationName":"GetSession", '
        b'"query": ' + json.dumps(GET_SESSION).encode() + b"}"
    )
    refused = await post(gate, "/private", body)
    assert refused.status == 403
    assert (await refused.json())["scope"] == "recording:s-1"
    assert echo.bodies == []
    g = await grants.add("alice", "recording:s-1", 600, "body test", "test")
    ok = await post(gate, "/private", body)
    assert ok.status == 200
    assert await ok.read() == body
    assert echo.bodies == [body]
    other = json.dumps(gql("GetSession", GET_SESSION, session_secure_id="s-2")).encode()
    assert (await post(gate, "/private", other)).status == 403
    await grants.revoke(g.id, "test")
    assert (await post(gate, "/private", body)).status == 403
    assert echo.bodies == [body]


async def test_json_field_picks_the_rule_and_binds_the_scope(
    gate: TestClient, echo: Echo, grants: RedisGrants
) -> None:
    replay = json.dumps({"query": {"kind": "SessionsQuery", "session_id": "s-9"}}).encode()
    listing = json.dumps({"query": {"kind": "SessionsListQuery"}}).encode()
    unknown = json.dumps({"query": {"kind": "HogQLQuery", "query": "select 1"}}).encode()
    assert (await post(gate, "/api/2/query", replay)).status == 403
    assert (await post(gate, "/api/2/query", listing)).status == 200
    blocked = await post(gate, "/api/2/query", unknown)
    assert blocked.status == 403
    assert "blocked by default" in (await blocked.json())["reasons"][0]
    g = await grants.add("alice", "recording:s-9", 600, "body test", "test")
    assert (await post(gate, "/api/2/query", replay)).status == 200
    await grants.revoke(g.id, "test")
    assert (await post(gate, "/api/2/query", replay)).status == 403
    assert echo.bodies == [listing, replay]


TRICKS = {
    "two operations, no operationName": gql(
        None, GET_SESSION + " query GetSessions { sessions { secure_id } }", session_secure_id="s-1"
    ),
    "operationName names no operation": gql("Nope", GET_SESSION, session_secure_id="s-1"),
    "a string literal beside the variable": gql(
        "GetSession",
        GET_SESSION.replace("{ secure_id }", '{ secure_id } x: session(secure_id: "s-2") { id }'),
        session_secure_id="s-1",
    ),
    "a literal in place of the variable": gql(
        "GetSession", GET_SESSION.replace("$session_secure_id)", '"s-2")'), session_secure_id="s-1"
    ),
    "another variable carrying an id": gql(
        "GetSession",
        GET_SESSION.replace("secure_id: $session_secure_id", "secure_id: $other"),
        session_secure_id="s-1",
        other="s-2",
    ),
    "a harmless name on another field (alias)": gql(
        "GetSession",
        "query GetSession($session_secure_id: String!) { session: events(id: $session_secure_id) "
        "{ id } }",
        session_secure_id="s-1",
    ),
    "a root fragment": gql(
        "GetSession",
        "query GetSession($session_secure_id: String!) { ...F } fragment F on Query "
        "{ session(secure_id: $session_secure_id) { id } }",
        session_secure_id="s-1",
    ),
    "a default value": gql(
        "GetSession",
        GET_SESSION.replace("String!)", 'String = "s-2")'),
        session_secure_id="s-1",
    ),
    "a batch": [gql("GetSession", GET_SESSION, session_secure_id="s-1")],
    "a persisted query": {
        "operationName": "GetSession",
        "variables": {"session_secure_id": "s-1"},
        "extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ab" * 32}},
    },
    "a variable that is not a string": gql("GetSession", GET_SESSION, session_secure_id=["s-1"]),
}


@pytest.mark.parametrize("name", list(TRICKS))
async def test_graphql_tricks_are_refused(
    gate: TestClient, echo: Echo, grants: RedisGrants, name: str
) -> None:
    await grants.add("alice", "recording:s-1", 600, "body test", "test")
    resp = await post(gate, "/private", json.dumps(TRICKS[name]).encode())
    assert resp.status in (400, 403), name
    assert echo.bodies == []


async def test_unknown_operation_is_blocked_by_default(gate: TestClient, echo: Echo) -> None:
    body = json.dumps(gql("DeleteEverything", "mutation DeleteEverything { wipe }")).encode()
    resp = await post(gate, "/private", body)
    assert resp.status == 403
    assert "'DeleteEverything'" in (await resp.json())["reasons"][0]
    listing = json.dumps(gql("GetSessions", "query GetSessions { sessions { id } }")).encode()
    assert (await post(gate, "/private", listing)).status == 200
    assert echo.bodies == [listing]


@pytest.mark.parametrize(
    "body",
    [
        b'{"query": ',
        b'{"query": {"kind": "SessionsListQuery"}, "query": {"kind": "SessionsQuery"}}',
        b'{"query": {"kind": "SessionsListQuery"}, "n": NaN}',
        b"\xef\xbb\xbf" + b'{"query": {"kind": "SessionsListQuery"}}',
        b'{"query": {"kind": "SessionsListQuery"}, "x": "\xff"}',
        b"[" * 100 + b"]" * 100,
    ],
)
async def test_malformed_json_is_refused(gate: TestClient, echo: Echo, body: bytes) -> None:
    resp = await post(gate, "/api/2/query", body)
    assert resp.status == 400
    assert echo.bodies == []


async def test_oversize_and_encoded_bodies_are_refused(gate: TestClient, echo: Echo) -> None:
    big = json.dumps({"query": {"kind": "SessionsListQuery"}, "pad": "x" * 5000}).encode()
    assert (await post(gate, "/api/2/query", big)).status == 413

    async def chunks() -> Any:  # no Content-Length: the cap holds while reading
        for _ in range(10):
            yield b" " * 1000
        yield b'{"query": {"kind": "SessionsListQuery"}}'

    chunked = await gate.post("/api/2/query", data=chunks(), headers={**bearer(), **JSON})
    assert chunked.status == 413
    gz = await gate.post(
        "/api/2/query",
        data=b"\x1f\x8b...",
        headers={**bearer(), **JSON, "Content-Encoding": "gzip"},
    )
    assert gz.status == 400
    assert echo.bodies == []


async def test_routes_without_body_rules_stream_as_before(gate: TestClient, echo: Echo) -> None:
    big = b"y" * 100_000  # over max_body_bytes: no body rule reads it
    resp = await gate.post("/api/2/upload", data=big, headers=bearer())
    assert resp.status == 200
    assert echo.bodies == [big]


async def test_forward_auth_refuses_body_routes(make_proxy: ProxyFactory) -> None:
    authz = await make_proxy(
        policy_text=POLICY,
        extra="forward_auth: {enabled: true, trusted_proxies: [127.0.0.1/32]}",
    )
    headers = {"X-Original-URI": "/private", "X-Original-Method": "POST", **bearer(), **JSON}
    resp = await authz.get("/_jit/authz", headers=headers)
    assert resp.status == 403
    assert "forward-auth cannot see" in json.dumps(await resp.json())
    headers["X-Original-URI"] = "/elsewhere"
    assert (await authz.get("/_jit/authz", headers=headers)).status == 200


def test_policy_errors_name_the_field() -> None:
    bad = [
        ("body: {xml: {}}", "body: must be {json"),
        ("body: {graphql: {fields: [a]}}", "body.graphql.operation: is required"),
        ("body: {graphql: {operation: Op}}", "body.graphql.fields: is required"),
        ("body: {json: {'a..b': x}}", "a field path"),
        ("body: {json: {a: '{project}'}}", "bound twice"),
        ("body: {graphql: {operation: Op, fields: [a], extra: 1}}", "unknown field"),
    ]
    for fragment, message in bad:
        text = f"""
version: 1
routes:
  - id: r
    path: /api/{{project}}/query
    access: identity
    {fragment}
"""
        with pytest.raises(ConfigErrors) as caught:
            compile_text(text, "p.yaml")
        assert message in str(caught.value), (fragment, str(caught.value))


def test_schema_takes_body_rules_and_refuses_malformed_ones() -> None:
    from test_policy_schema import schema_errors

    assert schema_errors(POLICY) == []
    from conftest import ROOT

    assert schema_errors((ROOT / "config" / "policy-body.example.yaml").read_text()) == []
    bad = POLICY.replace("fields: [sessions]", "fields: []")
    assert schema_errors(bad) != []
    assert schema_errors(POLICY.replace("body: {json:", "body: {xml:")) != []


def test_doc_examples_run_as_shown() -> None:
    import os
    import shlex
    import subprocess
    import sys

    from conftest import ROOT

    text = (ROOT / "docs" / "policy.md").read_text()
    blocks = [b.strip("\n").splitlines() for b in text.split("```")[1::2]]
    examples = [b for b in blocks if b and "policy-body.example.yaml" in b[0]]
    assert len(examples) == 2
    jitgate = str(Path(sys.executable).parent / "jitgate")
    for lines in examples:
        words = shlex.split(lines[0].removeprefix("$ "))
        env = {"PATH": os.environ.get("PATH", "/usr/bin")}
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        words[0] = jitgate
        out = subprocess.run(
            words, capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False
        )
        assert out.stdout.splitlines() == lines[1:], out.stderr


def test_policy_test_cases_carry_a_body(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    session = {
        "operationName": "GetSession",
        "query": GET_SESSION,
        "variables": {"session_secure_id": "a1b2"},
    }
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        f"""
policy: {ROOT / "config" / "policy-body.example.yaml"}
cases:
  - name: the session's grant opens it
    request: POST /private
    user: alice
    grants: ["recording:a1b2"]
    body: {json.dumps(session)}
    expect: allow
    expect_scope: "recording:a1b2"
  - name: another session's grant does not
    request: POST /private
    user: alice
    grants: ["recording:zz"]
    body: {json.dumps(session)}
    expect: deny
  - name: a body as text, malformed
    request: POST /private
    user: alice
    body: '{{"query": '
    expect: bad_request
  - name: no body given
    request: POST /private
    user: alice
    expect: blocked
"""
    )
    jitgate = str(Path(sys.executable).parent / "jitgate")
    out = subprocess.run(
        [jitgate, "policy", "test", str(cases)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "4 passed, 0 failed"
