"""The shipped nginx config (deploy/nginx/jitgate-authz.conf) with a real nginx in front of a
real upstream, jitgate in forward-auth mode and Redis: what the upstream receives.

Requests are sent to nginx as raw bytes, so every path trick reaches it as written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, RedisServer, Upstream, free_port, make_token
from nginxkit import Nginx, authz_conf
from test_authz import CORPUS, ENABLED, SNAPSHOTS, grant, records
from waiting import eventually

TOKEN = make_token("alice")
Reply = tuple[int, dict[str, str], bytes]


async def send(
    port: int,
    target: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    host: str = "127.0.0.1",
    local: str | None = None,
) -> Reply:
    """One request with exactly this request line; (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local, 0) if local else None
    )
    lines = [f"{method} {target} HTTP/1.1", "Host: replay.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    got = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        got[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), got, body


Stack = Callable[..., Awaitable[tuple[TestClient, Nginx]]]


@pytest.fixture
async def stack(make_proxy: ProxyFactory, upstream: Upstream) -> AsyncIterator[Stack]:
    """nginx with the shipped config in front of `upstream`, asking a jitgate of its own."""
    started: list[Nginx] = []

    async def start(*, redis: str | None = None, jitgate_port: int | None = None) -> Any:
        client = await make_proxy(extra=ENABLED, redis=redis)
        port = free_port()
        replay_port = int(upstream.url.rsplit(":", 1)[1])
        nginx = Nginx(
            authz_conf(listen=port, jitgate=jitgate_port or client.port, replay_tool=replay_port),
            port,
        )
        started.append(nginx)
        nginx.start()
        return client, nginx

    yield start
    for nginx in started:
        nginx.stop()


def hits_by_agent(upstream: Upstream) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, path, headers in upstream.hits:
        out.setdefault(headers.get("User-Agent", ""), []).append(path)
    return out


async def test_granted_request_reaches_the_upstream_with_jitgate_identity_only(
    stack: Stack, upstream: Upstream, tmp_path: Path
) -> None:
    client, nginx = await stack()
    await grant(client)
    forged = jwt.encode({"sub": "root"}, "x" * 32, algorithm="HS256")
    status, _, body = await send(
        nginx.port,
        SNAPSHOTS + "?q=1",
        {
            "Authorization": f"Bearer {TOKEN}",
            "X-Forwarded-User": "mallory",
            "x-forwarded-groups": "admins",
            "X-Forwarded-Email": "mallory@example.com",
            "X-Jitgate-Assertion": forged,
            "X-Jitgate-User": "root",
            "X_Forwarded_User": "root",
            "X-Original-URI": "/healthz",
            "Cookie": "a=1; jitgate_token=secret; b=2",
        },
    )
    assert status == 200, body
    ((method, path, headers),) = upstream.hits
    assert (method, path) == ("GET", SNAPSHOTS + "?q=1")
    low = {k.lower(): v for k, v in headers.items()}
    # What jitgate vouched for, and nothing the client sent under those names.
    assert low["x-forwarded-user"] == "alice"
    assert "x-forwarded-groups" not in low and "x-forwarded-email" not in low
    assert "x-jitgate-user" not in low and "x_forwarded_user" not in low
    assertion = jwt.decode(low["x-jitgate-assertion"], options={"verify_signature": False})
    assert assertion["sub"] == "alice"
    jwks = await (await client.get("/_jit/.well-known/jwks.json")).json()
    key = jwt.PyJWK(jwks["keys"][0])
    jwt.decode(
        low["x-jitgate-assertion"], key, algorithms=[key.algorithm_name], audience=upstream.url
    )
    assert "authorization" not in low and "x-original-uri" not in low
    assert low["cookie"] == "a=1; b=2"
    (rec,) = await records(tmp_path, 1)
    assert rec["path"] == SNAPSHOTS and rec["status"] == 200 and rec["client_ip"] == "127.0.0.1"


async def test_public_route_forged_identity_never_reaches_the_upstream(
    stack: Stack, upstream: Upstream
) -> None:
    """Nobody to vouch for (a public route): the client's identity headers still go."""
    _, nginx = await stack()
    forged = {
        "X-Forwarded-User": "mallory",
        "X-Jitgate-Assertion": "forged",
        "Cookie": "jitgate_token=t",
    }
    status, _, _ = await send(nginx.port, "/healthz", forged)
    assert status == 200
    ((_, path, headers),) = upstream.hits
    low = {k.lower() for k in headers}
    assert path == "/healthz"
    assert not low & {"x-forwarded-user", "x-jitgate-assertion", "cookie"}, headers


async def test_the_original_method_is_decided(
    stack: Stack, upstream: Upstream, tmp_path: Path
) -> None:
    """nginx's auth subrequest is a GET; the decision is on the client's method."""
    client, nginx = await stack()
    await grant(client)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Length": "5"}
    reader, writer = await asyncio.open_connection("127.0.0.1", nginx.port)
    lines = [f"POST {SNAPSHOTS} HTTP/1.1", "Host: replay.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in auth.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\nhello").encode())
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 "), data[:300]
    ((method, path, _),) = upstream.hits
    assert (method, path) == ("POST", SNAPSHOTS)
    assert json.loads(data.partition(b"\r\n\r\n")[2])["body_bytes"] == 5
    (rec,) = await records(tmp_path, 1)
    assert rec["method"] == "POST" and rec["path"] == SNAPSHOTS


async def test_refusals_through_nginx(stack: Stack, upstream: Upstream) -> None:
    _, nginx = await stack()
    browser = {"Accept": "text/html"}
    # Not signed in: a script gets jitgate's JSON, a browser goes to sign in.
    status, headers, body = await send(nginx.port, SNAPSHOTS)
    assert status == 401
    assert json.loads(body)["login_url"] == f"/_jit/login?next={SNAPSHOTS}"
    assert headers["www-authenticate"].startswith("Bearer")
    status, headers, _ = await send(nginx.port, SNAPSHOTS, browser)
    assert status == 302 and headers["location"].endswith(f"/_jit/login?next={SNAPSHOTS}")
    # Signed in without a grant: 403 with where to ask; a browser is sent there.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, body = await send(nginx.port, SNAPSHOTS, auth)
    assert status == 403
    refusal = json.loads(body)
    assert refusal["error"] == "access_denied" and refusal["scope"] == "recording:1/demo-1"
    status, headers, _ = await send(nginx.port, SNAPSHOTS, {**auth, **browser})
    assert status == 302 and "/_jit/request?scope=recording:1/demo-1" in headers["location"]
    # A path jitgate refuses: 400 with the reason, not nginx's 500.
    status, _, body = await send(nginx.port, "/api/projects/1/x/../session_recordings/demo-1", auth)
    assert status == 400 and "canonical" in json.loads(body)["reasons"][0]
    # jitgate's own pages go through; its decision endpoint does not.
    status, _, _ = await send(nginx.port, "/_jit/healthz")
    assert status == 200
    status, _, _ = await send(
        nginx.port, "/_jit/authz", {**auth, "X-Original-URI": SNAPSHOTS, "X-Original-Method": "GET"}
    )
    assert status == 404
    assert upstream.hits == []


async def test_path_corpus_through_nginx(stack: Stack, upstream: Upstream, tmp_path: Path) -> None:
    """Every variant: refused by nginx or jitgate, or the upstream gets the path decided on."""
    client, nginx = await stack()
    await grant(client)
    statuses = {}
    for n, target in enumerate(CORPUS):
        agent = f"corpus-{n}"
        status, _, body = await send(
            nginx.port, target, {"Authorization": f"Bearer {TOKEN}", "User-Agent": agent}
        )
        statuses[agent] = (target, status, body[:200])
    seen = hits_by_agent(upstream)
    allowed = {agent for agent, (_, status, _) in statuses.items() if status == 200}

    def decided_paths() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        audit = tmp_path / "audit.jsonl"
        for line in audit.read_text().splitlines() if audit.exists() else ():
            rec = json.loads(line)
            if rec.get("mode") == "forward_auth" and rec["status"] == 200:
                out.setdefault(rec["user_agent"], []).append(rec["path"])
        return out

    decided = await eventually(
        lambda: (found := decided_paths()).keys() >= allowed and found,
        what="the records of the allowed decisions",
    )
    forwarded = 0
    for agent, (target, status, body) in statuses.items():
        if status == 200:
            # Decided once, on the path the upstream then received (query aside).
            (got,) = seen[agent]
            assert decided[agent] == [got.split("?", 1)[0]], (target, got, decided.get(agent))
            # As sent; nginx reads an absolute-form target (http://host/p) as its path.
            assert got == target.removeprefix("http://evil.example"), (target, got)
            forwarded += 1
        else:
            assert agent not in seen, (target, status, seen.get(agent))
            assert status in (400, 401, 403, 404), (target, status, body)
    assert forwarded >= 3  # the canonical spellings of granted and identity paths


async def test_untrusted_source_of_the_original_uri_is_refused(
    stack: Stack, upstream: Upstream
) -> None:
    """A client that talks to jitgate directly (not from nginx's address) names nothing."""
    client, _ = await stack()
    await grant(client)
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "X-Original-URI": SNAPSHOTS,
        "X-Original-Method": "GET",
    }
    status, _, body = await send(client.port, "/_jit/authz", headers, local="127.0.0.2")
    assert status == 403
    assert json.loads(body)["error"] == "untrusted_proxy"
    status, _, _ = await send(client.port, "/_jit/authz", headers)  # from 127.0.0.1: trusted
    assert status == 200


async def test_redis_down_no_request_is_forwarded(
    own_redis: RedisServer, stack: Stack, upstream: Upstream
) -> None:
    client, nginx = await stack(redis=own_redis.url)
    await grant(client)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, _ = await send(nginx.port, SNAPSHOTS, auth)
    assert status == 200 and len(upstream.hits) == 1
    own_redis.kill()
    for _ in range(3):
        status, _, body = await send(nginx.port, SNAPSHOTS, auth)
        assert status == 503, body
        assert json.loads(body)["error"] == "unavailable"
    assert len(upstream.hits) == 1
    own_redis.start()  # the audit queue drains at shutdown instead of waiting out its grace


async def test_jitgate_down_no_request_is_forwarded(stack: Stack, upstream: Upstream) -> None:
    _, nginx = await stack(jitgate_port=free_port())  # nothing listens there
    status, _, body = await send(nginx.port, SNAPSHOTS, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 503
    assert json.loads(body)["error"] == "unavailable"
    assert upstream.hits == []


def test_shipped_config_names_three_addresses_to_change() -> None:
    """authz_conf finds each CHANGE line once, and nginx -t accepts the result."""
    text = authz_conf(listen=1, jitgate=2, replay_tool=3)
    assert "server 127.0.0.1:3;" in text and "server 127.0.0.1:2;" in text
    assert "listen 127.0.0.1:1;" in text
    nginx = Nginx(text, 1)
    try:
        nginx.check()
    finally:
        nginx.stop()


# Every name the shipped config clears, as the docs list them (written out, not read from it).
DROPPED = [
    "Remote-User",
    "Remote-Email",
    "Remote-Groups",
    "Remote-Name",
    "X-Remote-User",
    "X-Remote-Email",
    "X-Remote-Groups",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Webauth-User",
    "X-Webauth-Email",
    "X-User",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Forwarded-Prefix",
    "X-HTTP-Method-Override",
    "X-Real-IP",
    "True-Client-IP",
]


async def test_listed_headers_never_reach_the_upstream_through_nginx(
    stack: Stack, upstream: Upstream
) -> None:
    client, nginx = await stack()
    await grant(client)
    for path in (SNAPSHOTS, "/healthz"):
        sent: dict[str, str] = {"Authorization": f"Bearer {TOKEN}"}
        for n, name in enumerate(DROPPED):
            mixed = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))
            sent[mixed] = f"forged-{n}"
            sent[name.replace("-", "_")] = f"forged-{n}_"
        sent["X-Forwarded-For"] = "6.6.6.6"
        sent["Forwarded"] = "for=6.6.6.6"
        status, _, body = await send(nginx.port, path, sent)
        assert status == 200, body
        _, got, headers = upstream.hits[-1]
        assert got == path
        leaked = [f"{k}: {v}" for k, v in headers.items() if "forged" in v or "6.6.6.6" in v]
        assert leaked == []
        low = {k.lower(): v for k, v in headers.items()}
        assert low["x-real-ip"] == low["x-forwarded-for"] == "127.0.0.1"
        assert low["forwarded"] == 'for=127.0.0.1;proto=http;host="replay.test"'
        assert low.get("x-forwarded-user", "alice") == "alice"
