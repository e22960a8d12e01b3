"""Functional tests: jitgate between a real client, a real upstream and a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, RedisServer, Upstream, bearer, make_token
from waiting import eventually

from proxy.audit.store import Query
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
RECORDING = "/api/projects/1/session_recordings/demo-1"


async def add_grant(client: TestClient, user: str, scope: str, ttl: float) -> str:
    grant = await client.app[STATE].grants.add(user, scope, ttl, "test", "pytest")
    return grant.id


async def test_deny_grant_allow_revoke_deny_then_expiry(
    proxy: TestClient, upstream: Upstream
) -> None:
    r = await proxy.get(SNAPSHOTS, headers=bearer("alice"))
    assert r.status == 403
    assert upstream.paths() == []

    grant_id = await add_grant(proxy, "alice", "recording:1/demo-1", 60)
    r = await proxy.get(SNAPSHOTS, headers=bearer("alice"))
    assert r.status == 200
    assert upstream.paths() == [SNAPSHOTS]

    # Another user gains nothing from alice's grant.
    r = await proxy.get(SNAPSHOTS, headers=bearer("bob"))
    assert r.status == 403

    assert await proxy.app[STATE].grants.revoke(grant_id) is not None
    r = await proxy.get(SNAPSHOTS, headers=bearer("alice"))
    assert r.status == 403

    # Long enough to be used at once on a loaded machine, short enough to wait out.
    await add_grant(proxy, "alice", "recording:1/demo-1", 2)
    r = await proxy.get(SNAPSHOTS, headers=bearer("alice"))
    assert r.status == 200

    grants = proxy.app[STATE].grants

    async def expired() -> bool:
        return await grants.check("alice", ("recording:1/demo-1", "project:1")) is None

    await eventually(expired, what="the grant to expire")
    r = await proxy.get(SNAPSHOTS, headers=bearer("alice"))
    assert r.status == 403
    assert upstream.paths() == [SNAPSHOTS, SNAPSHOTS]


async def test_grant_keys_expire_in_redis_by_themselves(
    proxy: TestClient, redis_server: RedisServer
) -> None:
    grant_id = await add_grant(proxy, "alice", "recording:1/demo-1", 0.3)
    with redis_server.client() as c:
        keys = [k.decode() for k in c.keys("jit:*") if not k.endswith(b"audit")]
        assert any(k.startswith("jit:active:") for k in keys)
        assert all(c.pttl(k) > 0 for k in keys)
        await eventually(lambda: not [k for k in c.keys("jit:*") if k.startswith(b"jit:active:")])
        # The record is kept for history, and Redis drops it too once that has passed.
        history_ms = proxy.app[STATE].grants.history_ttl * 1000
        assert history_ms - 1000 < c.pttl(f"jit:grant:{grant_id}") <= history_ms


async def test_project_grant_covers_its_recordings_only(
    proxy: TestClient, upstream: Upstream
) -> None:
    await add_grant(proxy, "alice", "project:1", 60)
    r = await proxy.get(SNAPSHOTS, headers=bearer())
    assert r.status == 200
    r = await proxy.get("/api/projects/1/session_recordings/", headers=bearer())
    assert r.status == 200
    r = await proxy.get("/api/projects/2/session_recordings/x/snapshots", headers=bearer())
    assert r.status == 403


async def test_recording_grant_does_not_cover_its_project_or_siblings(proxy: TestClient) -> None:
    await add_grant(proxy, "alice", "recording:1/demo-1", 60)
    r = await proxy.get("/api/projects/1/session_recordings/demo-2", headers=bearer())
    assert r.status == 403


async def test_refusal_json_for_api_clients(proxy: TestClient) -> None:
    r = await proxy.get(SNAPSHOTS, headers=bearer())
    assert r.status == 403
    body = await r.json()
    assert body["error"] == "access_denied"
    assert body["scope"] == "recording:1/demo-1"
    assert body["request_url"].endswith("/_jit/request?scope=recording:1/demo-1")
    assert r.headers["Cache-Control"] == "no-store"


async def test_refusal_page_for_browsers(proxy: TestClient) -> None:
    headers = {**bearer(), "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    r = await proxy.get(SNAPSHOTS, headers=headers)
    assert r.status == 403
    assert r.content_type == "text/html"
    page = await r.text()
    assert "recording:1/demo-1" in page and "project:1" in page
    assert "/_jit/request?scope=recording:1/demo-1" in page
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    r = await proxy.get("/_jit/request", params={"scope": "recording:1/demo-1"}, headers=headers)
    assert r.status == 200
    page = await r.text()
    assert "demo-recordings" in page and "you may request it" in page
    assert 'jitgate grants request --token "$TOKEN" --scope recording:1/demo-1' in page
    r = await proxy.get("/_jit/request", params={"scope": "project:1"}, headers=headers)
    page = await r.text()
    assert "project-wide" in page and "needs 1 approval" in page and "not open to you" in page
    r = await proxy.get("/_jit/request", params={"scope": "org:1"})
    assert "--user YOUR-USER --scope org:1" in await r.text()


async def test_refusal_page_escapes_the_path(proxy: TestClient) -> None:
    headers = {**bearer(), "Accept": "text/html"}
    r = await proxy.get(
        "/api/projects/1/session_recordings/%3Cscript%3Ex/snapshots", headers=headers
    )
    assert r.status == 403
    assert "<script>" not in await r.text()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no credentials"),
        ({"Authorization": "Bearer not-a-jwt"}, "malformed token"),
        ({"Authorization": "Basic YWxpY2U6eA=="}, "no credentials"),
    ],
)
async def test_no_valid_identity_is_401(
    proxy: TestClient, upstream: Upstream, headers: dict[str, str], reason: str
) -> None:
    for path in (SNAPSHOTS, "/dashboard"):
        r = await proxy.get(path, headers=headers)
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert reason in (await r.json())["reasons"][0]
    assert upstream.paths() == []


async def test_identity_from_cookie(proxy: TestClient, upstream: Upstream) -> None:
    r = await proxy.get("/dashboard", cookies={"jitgate_token": make_token("carol")})
    assert r.status == 200


async def test_public_route_needs_no_identity(proxy: TestClient, upstream: Upstream) -> None:
    r = await proxy.get("/static/app.js")
    assert r.status == 200
    assert upstream.paths() == ["/static/app.js"]


async def test_blocked_route_refused_even_with_grant(proxy: TestClient, upstream: Upstream) -> None:
    await add_grant(proxy, "alice", "project:1", 60)
    r = await proxy.post(f"{RECORDING}/sharing", headers=bearer(), json={"enabled": True})
    assert r.status == 403
    assert (await r.json())["error"] == "blocked"
    assert upstream.paths() == []


async def test_prefix_is_never_forwarded(proxy: TestClient, upstream: Upstream) -> None:
    for path in ("/_jit/nope", "/_jit", "/_JIT/x", "/a/../_jit/zzz", "/_jit/./%7e"):
        r = await proxy.get(path, headers=bearer())
        assert r.status in (404, 400), path
    assert upstream.paths() == []


async def test_identity_headers_and_credentials_are_stripped(
    proxy: TestClient, upstream: Upstream
) -> None:
    # An "_" spelling (x_forwarded_user) is refused outright: tests/test_identity_headers.py.
    headers = {
        **bearer(),
        "X-Forwarded-User": "admin",
        "X-JITGATE-USER": "root",
        "X-Forwarded-For": "6.6.6.6",
        "Cookie": "jitgate_token=abc; other=1",
    }
    r = await proxy.get("/dashboard", headers=headers)
    assert r.status == 200
    seen = {k.lower(): v for k, v in upstream.hits[-1][2].items()}
    assert "authorization" not in seen
    assert not any(k.replace("_", "-") in ("x-forwarded-user", "x-jitgate-user") for k in seen)
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["cookie"] == "other=1"


async def test_healthz_readyz_metrics(proxy: TestClient) -> None:
    assert (await proxy.get("/_jit/healthz")).status == 200
    r = await proxy.get("/_jit/readyz")
    assert r.status == 200, await r.text()
    assert (await r.json())["checks"] == {"redis": "ok", "upstream": "ok"}
    await add_grant(proxy, "alice", "recording:1/demo-1", 60)
    await proxy.get(SNAPSHOTS, headers=bearer())
    await proxy.get(SNAPSHOTS, headers=bearer("bob"))
    text = await (await proxy.get("/_jit/metrics")).text()
    assert 'jitgate_requests_total{decision="allow",route="recording"} 1.0' in text
    assert 'jitgate_requests_total{decision="deny",route="recording"} 1.0' in text
    assert "jitgate_active_grants 1.0" in text
    assert 'jitgate_request_duration_seconds_count{route="recording"} 2.0' in text


async def test_readyz_fails_when_upstream_down(make_proxy: ProxyFactory) -> None:
    from conftest import free_port

    client = await make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    r = await client.get("/_jit/readyz")
    assert r.status == 503
    assert (await r.json())["checks"]["upstream"].startswith("failed")


async def test_redis_down_fails_closed(
    own_redis: RedisServer, make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy(redis=own_redis.url)
    await add_grant(client, "alice", "recording:1/demo-1", 60)
    assert (await client.get(SNAPSHOTS, headers=bearer())).status == 200
    own_redis.kill()
    started = time.monotonic()
    r = await client.get(SNAPSHOTS, headers=bearer())
    assert r.status == 503
    assert time.monotonic() - started < 3
    assert (await r.json())["error"] == "unavailable"
    assert upstream.paths() == [SNAPSHOTS]  # the refused request never reached upstream
    assert (await client.get("/static/x.css")).status == 200
    assert (await client.get("/dashboard", headers=bearer())).status == 200
    assert (await client.get("/_jit/readyz")).status == 503
    metrics = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_redis_errors_total{op="grant_check"} 1.0' in metrics
    # Redis comes back (empty, as it keeps nothing): once the breaker's probe sees it,
    # access follows the new state.
    own_redis.start()

    async def refused() -> bool:
        return (await client.get(SNAPSHOTS, headers=bearer())).status == 403

    await eventually(refused, within=2, what="the breaker to close")


async def test_audit_records_every_decision(proxy: TestClient, tmp_path: Path) -> None:
    await add_grant(proxy, "alice", "recording:1/demo-1", 60)
    await proxy.get(SNAPSHOTS, headers=bearer())
    await proxy.get(SNAPSHOTS, headers=bearer("bob"))
    await proxy.get(SNAPSHOTS)
    await proxy.get("/a%2fb", headers=bearer())
    await proxy.app[STATE].audit.flush(force=True)
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    allow, done, deny, unauth, bad = lines
    # A forwarded request: its decision before it went upstream, then how it ended.
    assert allow["event"] == "access.allow" and "status" not in allow
    assert allow["user"] == "alice" and allow["scope"] == "recording:1/demo-1"
    assert allow["grant_id"].startswith("g-") and allow["route"] == "recording"
    assert allow["path"] == SNAPSHOTS and allow["client_ip"] == "127.0.0.1"
    assert allow["policy_version"]
    assert done["event"] == "access.done" and done["decision_id"] == allow["id"]
    assert done["status"] == 200 and done["bytes"] > 0 and done["duration_ms"] >= 0
    assert {k: done[k] for k in ("user", "scope", "recording", "grant_id", "path")} == {
        k: allow[k] for k in ("user", "scope", "recording", "grant_id", "path")
    }
    assert deny["event"] == "access.deny" and deny["user"] == "bob" and deny["status"] == 403
    assert "no active grant" in deny["reasons"][0]
    assert unauth["status"] == 401 and "user" not in unauth
    assert bad["status"] == 400 and bad["route"] == "_invalid"
    assert all(x["policy_version"] == allow["policy_version"] for x in lines if x is not done)
    stream = redis_sync.Redis.from_url(proxy.app[STATE].settings.redis.url or "")
    with stream:
        entries = stream.xrange("jit:audit")
    assert [json.loads(e[1][b"record"])["id"] for e in entries] == [x["id"] for x in lines]


async def test_concurrent_requests_each_get_one_decision_and_one_completion(
    proxy: TestClient, tmp_path: Path
) -> None:
    await add_grant(proxy, "alice", "recording:1/demo-1", 60)
    n = 200
    results = await asyncio.gather(*(proxy.get(SNAPSHOTS, headers=bearer()) for _ in range(n)))
    assert [r.status for r in results] == [200] * n
    await proxy.app[STATE].audit.flush(force=True)
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    decided = {r["id"] for r in recs if r["event"] == "access.allow"}
    done = [r["decision_id"] for r in recs if r["event"] == "access.done"]
    assert len(recs) == 2 * n and len(decided) == n and sorted(done) == sorted(decided)
    # The Redis trail has the same, and its index answers "who viewed demo-1" with them.
    page = await proxy.app[STATE].audit_store.query(Query(recording="demo-1", limit=1000))
    assert {r["id"] for r in page.records} == {r["id"] for r in recs} and page.next is None


async def test_audit_sink_outage_is_counted_and_recovered(
    own_redis: RedisServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client = await make_proxy(redis=own_redis.url)
    own_redis.kill()
    for _ in range(3):
        await client.get("/dashboard", headers=bearer())
    await client.app[STATE].audit.flush(force=True)
    metrics = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_audit_write_failures_total{sink="redis"}' in metrics
    # /dashboard is forwarded: a decision and a completion each.
    assert 'jitgate_audit_records_delivered_total{sink="file"} 6.0' in metrics
    own_redis.start()
    await client.app[STATE].audit.flush(force=True)
    with own_redis.client() as c:
        assert c.xlen("jit:audit") == 6


async def test_upstream_redirect_location_is_rewritten(
    make_proxy: ProxyFactory, aiohttp_server: Any
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://{request.host}/dashboard")

    app = web.Application()
    app.router.add_get("/recordings/demo-1", redirect)
    server = await aiohttp_server(app)
    client = await make_proxy(upstream_url=str(server.make_url("")).rstrip("/"))
    r = await client.get("/recordings/demo-1", headers=bearer(), allow_redirects=False)
    assert r.status == 302
    assert r.headers["Location"] == str(client.make_url("/dashboard"))


async def test_bad_config_policy_is_startup_error(tmp_path: Path) -> None:
    from proxy import policyfile
    from proxy.errors import ConfigErrors

    bad = tmp_path / "p.yaml"
    bad.write_text((ROOT / "config" / "policy.yaml").read_text().replace('{recording}"', '{x}"'))
    with pytest.raises(ConfigErrors) as exc:
        policyfile.load(bad)
    assert f"{bad}:" in str(exc.value) and "unknown parameter {x}" in str(exc.value)


async def test_upstream_down_is_502_and_counted(make_proxy: ProxyFactory) -> None:
    from conftest import free_port

    client = await make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    r = await client.get("/dashboard", headers=bearer())
    assert r.status == 502
    assert "upstream unreachable" in await r.text()
    metrics = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_upstream_errors_total{kind="connect"} 1.0' in metrics


async def test_websocket_through_the_gate(make_proxy: ProxyFactory, aiohttp_server: Any) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws/live", echo)
    server = await aiohttp_server(app)
    client = await make_proxy(upstream_url=str(server.make_url("")).rstrip("/"))
    async with client.ws_connect("/ws/live", headers=bearer()) as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str()) == "echo:hi"
    with pytest.raises(Exception, match="401"):
        await client.ws_connect("/ws/live")


async def test_prefix_is_configurable(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(extra='prefix: "/_gate"')
    assert (await client.get("/_gate/healthz")).status == 200
    assert (await client.get("/_gate/anything", headers=bearer())).status == 404
    assert (await client.get("/_jit/healthz", headers=bearer())).status == 200
    assert upstream.paths() == ["/_jit/healthz"]
