"""Scope variables from query parameters, end to end: jitgate, real Redis, an echoing upstream.

A route with `query:` decides on the recording its query names; the upstream receives the
query exactly as the client sent it, and a query that can be read more than one way never
reaches it.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, Upstream, bearer
from redis.asyncio import Redis

from proxy.errors import ConfigErrors
from proxy.grantstore import RedisGrants
from proxy.policyfile import compile_text
from proxy.queryrules import BadQuery, bind, compile_bind

POLICY = """
version: 1
default: identity
routes:
  - id: events
    methods: [GET]
    path: /api/{project}/events
    query: {session_id: "{recording}"}
    scope: "recording:{project}/{recording}"
  - id: matching
    methods: [GET]
    path: /api/{project}/matching_events
    query: {session_ids: '["{recording}"]'}
    scope: "recording:{project}/{recording}"
hierarchy:
  - scope: "recording:{project}/{recording}"
    covered_by: ["project:{project}"]
"""

JSON = {"Accept": "application/json"}


@pytest.fixture
async def gate(make_proxy: ProxyFactory) -> TestClient:
    return await make_proxy(policy_text=POLICY)


@pytest.fixture
async def grants(redis_url: str) -> Any:
    redis = Redis.from_url(redis_url)
    yield RedisGrants(redis)
    await redis.aclose()


async def test_the_named_recording_needs_its_grant_and_the_query_goes_as_sent(
    gate: TestClient, upstream: Upstream, grants: RedisGrants
) -> None:
    target = "/api/2/events?session_id=rec-1&limit=5"
    refused = await gate.get(target, headers={**bearer(), **JSON})
    assert refused.status == 403
    assert (await refused.json())["scope"] == "recording:2/rec-1"
    assert upstream.hits == []
    g = await grants.add("alice", "recording:2/rec-1", 600, "query test", "test")
    ok = await gate.get(target, headers=bearer())
    assert ok.status == 200
    assert (await ok.json())["path"] == target
    other = await gate.get("/api/2/events?session_id=rec-2", headers={**bearer(), **JSON})
    assert other.status == 403
    # Percent-encoded and JSON-shaped values: decided on what the upstream decodes.
    encoded = "/api/2/matching_events?session_ids=%5B%22rec-1%22%5D&events=%5B%5D"
    ok = await gate.get(encoded, headers=bearer())
    assert ok.status == 200
    assert (await ok.json())["path"] == encoded
    await grants.revoke(g.id, "test")
    for path in (target, encoded):
        after = await gate.get(path, headers={**bearer(), **JSON})
        assert after.status == 403, path
    assert upstream.paths() == [target, encoded]


async def test_a_project_grant_covers_the_named_recording(
    gate: TestClient, upstream: Upstream, grants: RedisGrants
) -> None:
    await grants.add("alice", "project:2", 600, "query test", "test")
    assert (await gate.get("/api/2/events?session_id=any", headers=bearer())).status == 200
    assert (await gate.get("/api/3/events?session_id=any", headers=bearer())).status == 403
    assert upstream.paths() == ["/api/2/events?session_id=any"]


AMBIGUOUS = [
    "session_id=rec-1&session_id=rec-2",  # first or last wins, by framework
    "session_id=rec-2&session_id=rec-1",
    "session%5Fid=rec-2&session_id=rec-1",  # an encoded name
    "Session_id=rec-2&session_id=rec-1",  # another case
    "session_id=rec-1;session_id=rec-2",  # ';' read as '&' by some servers
    "limit=5",  # missing
    "session_id=",  # empty
    "session_id",  # no value at all
    "session_id=rec-1%00",  # NUL
    "session_id=rec%2F1",  # a '/' would change the scope's shape
    "session_id=rec+1",  # a space
    "session_id=%FF",  # not UTF-8
]


@pytest.mark.parametrize("query", AMBIGUOUS)
async def test_ambiguous_or_missing_parameters_are_refused(
    gate: TestClient, upstream: Upstream, grants: RedisGrants, query: str
) -> None:
    # Even holding grants for both recordings named, nothing is forwarded.
    for rec in ("rec-1", "rec-2"):
        await grants.add("alice", f"recording:2/{rec}", 600, "query test", "test")
    resp = await gate.get(f"/api/2/events?{query}", headers={**bearer(), **JSON})
    assert resp.status == 400, query
    body = await resp.json()
    assert "cannot decide this request" in body["reasons"][0]
    assert upstream.hits == []


async def test_matching_events_takes_exactly_one_plain_id(
    gate: TestClient, upstream: Upstream, grants: RedisGrants
) -> None:
    await grants.add("alice", "recording:2/rec-1", 600, "query test", "test")
    for value in ('["rec-1","rec-2"]', '[ "rec-1"]', '["rec\\u002d1"]', "rec-1", '["rec-1"'):
        resp = await gate.get(
            "/api/2/matching_events", params={"session_ids": value}, headers=bearer()
        )
        assert resp.status == 400, value
    assert upstream.hits == []


FORWARD_AUTH = """
forward_auth: {enabled: true, trusted_proxies: [127.0.0.1/32]}
"""


async def test_forward_auth_decides_on_the_query_too(
    make_proxy: ProxyFactory, grants: RedisGrants
) -> None:
    authz = await make_proxy(policy_text=POLICY, extra=FORWARD_AUTH)
    await grants.add("alice", "recording:2/rec-1", 600, "query test", "test")

    async def ask(uri: str) -> int:
        headers = {"X-Original-URI": uri, "X-Original-Method": "GET", **bearer(), **JSON}
        return (await authz.get("/_jit/authz", headers=headers)).status

    assert await ask("/api/2/events?session_id=rec-1") == 200
    assert await ask("/api/2/events?session_id=rec-2") == 403
    assert await ask("/api/2/events?session_id=rec-1&session_id=rec-2") == 400
    assert await ask("/api/2/events") == 400


def test_policy_errors_name_the_field() -> None:
    bad = [
        ('query: {session_id: "{recording}"}\n    access: identity', "only protected routes"),
        ("query: {session_id: plain}", "must name at least one variable"),
        ('query: {"a b": "{recording}"}', "a parameter name"),
        ('query: {session_id: "{project}"}', "bound twice"),
        ('query: {a: "{recording}", A: "{x}"}', "named twice"),
        ("query: [session_id]", "must map parameters"),
    ]
    for fragment, message in bad:
        text = f"""
version: 1
routes:
  - id: r
    path: /api/{{project}}/events
    scope: "recording:{{project}}/{{recording}}"
    {fragment}
"""
        with pytest.raises(ConfigErrors) as caught:
            compile_text(text, "p.yaml")
        assert message in str(caught.value), (fragment, str(caught.value))
        assert "routes[0].query" in str(caught.value)


def test_a_query_decision_is_never_cached_by_path() -> None:
    policy = compile_text(POLICY, "p.yaml")
    first = policy.match("GET", "/api/2/events", "session_id=a")
    second = policy.match("GET", "/api/2/events", "session_id=b")
    assert (first.scope, second.scope) == ("recording:2/a", "recording:2/b")
    assert policy.match("GET", "/api/2/events", "").invalid is not None


def test_bind_reads_plus_and_percent_as_the_upstream_does() -> None:
    b = (compile_bind("q", "x:{v}"),)
    assert bind("q=x%3Aab", b) == {"v": "ab"}
    with pytest.raises(BadQuery):
        bind("q=x:a+b", b)


def test_schema_takes_query_rules_and_refuses_them_off_protected_routes() -> None:
    from test_policy_schema import schema_errors

    assert schema_errors(POLICY) == []
    off = POLICY.replace(
        '    scope: "recording:{project}/{recording}"\n', "    access: identity\n", 1
    )
    assert schema_errors(off) != []
