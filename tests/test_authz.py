"""Forward-auth ({prefix}/authz) against a real jitgate, Redis and upstream, without a proxy.

tests/test_authz_nginx.py puts the shipped nginx config in front; these tests speak to the
endpoint directly, as nginx, Traefik and Envoy would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, RedisServer, Upstream, bearer, make_token
from test_path_tricks import TRICKS
from test_paths import NORMALISED, REFUSED
from waiting import eventually

from proxy.errors import BadPath, ConfigErrors
from proxy.paths import normalise, split_target
from proxy.settings import load
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
ENABLED = """
forward_auth: {enabled: true, trusted_proxies: [127.0.0.1/32]}
forward: {user_headers: true, assertion: true}
"""
KEY = "identity: {hs_secret: test-secret-0123456789abcdef0123456789abcdef}\n"
BROWSER = {"Accept": "text/html,application/xhtml+xml"}


def nginx_style(uri: str, method: str = "GET", **more: str) -> dict[str, str]:
    return {"X-Original-URI": uri, "X-Original-Method": method, **more}


async def grant(client: TestClient, scope: str = "recording:1/demo-1", user: str = "alice") -> str:
    return (await client.app[STATE].grants.add(user, scope, 60, "test", "pytest")).id


async def records(tmp_path: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` forward-auth records of the audit file, once they are written."""

    def read() -> list[dict[str, Any]]:
        path = tmp_path / "audit.jsonl"
        if not path.exists():
            return []
        found = [json.loads(line) for line in path.read_text().splitlines()]
        return [r for r in found if r.get("mode") == "forward_auth"]

    return (await eventually(lambda: len(read()) >= count and read(), what="audit records"))[:count]


@pytest.fixture
async def authz(make_proxy: ProxyFactory) -> TestClient:
    return await make_proxy(extra=ENABLED)


async def test_allowed_with_a_grant_gives_the_identity_headers(
    authz: TestClient, upstream: Upstream, tmp_path: Path
) -> None:
    grant_id = await grant(authz)
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **bearer()))
    assert r.status == 200
    assert r.headers["X-Forwarded-User"] == "alice"
    assertion = jwt.decode(r.headers["X-Jitgate-Assertion"], options={"verify_signature": False})
    assert assertion["sub"] == "alice"
    assert r.headers["Cache-Control"] == "no-store"
    assert upstream.hits == []  # forward-auth never touches the upstream itself
    (rec,) = await records(tmp_path, 1)
    assert rec["event"] == "access.allow" and rec["decision"] == "allow"
    assert rec["grant_id"] == grant_id and rec["path"] == SNAPSHOTS and rec["status"] == 200
    assert rec["method"] == "GET" and rec["bytes"] == 0 and rec["user"] == "alice"


async def test_refusals_say_why_and_where_to_go(authz: TestClient, tmp_path: Path) -> None:
    # Not signed in: 401, a login URL; a browser gets it as Location for nginx to redirect.
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS))
    assert r.status == 401 and "Location" not in r.headers
    body = await r.json()
    assert body["error"] == "unauthenticated" and body["reason_code"] == "no_credentials"
    assert body["login_url"] == f"/_jit/login?next={SNAPSHOTS}"
    assert json.loads(r.headers["X-Jitgate-Refusal"]) == body
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="jitgate"'  # no token to blame
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **BROWSER))
    assert r.status == 401 and r.headers["Location"] == f"/_jit/login?next={SNAPSHOTS}"
    # Signed in, no grant: 403 naming the scope and where to ask for it.
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **bearer()))
    assert r.status == 403
    body = await r.json()
    assert body["error"] == "access_denied" and body["scope"] == "recording:1/demo-1"
    assert body["reasons"] == ["no active grant for recording:1/demo-1 (or project:1)"]
    assert body["request_url"].startswith("/_jit/request?scope=recording:1/demo-1&next=")
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **bearer(), **BROWSER))
    assert r.status == 403 and r.headers["Location"] == body["request_url"]
    # A POST is not sent to a page: the script gets the status and the JSON.
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, "POST", **BROWSER))
    assert r.status == 401 and "Location" not in r.headers
    # Blocked by policy, grant or not.
    await grant(authz)
    sharing = "/api/projects/1/session_recordings/demo-1/sharing"
    r = await authz.get("/_jit/authz", headers=nginx_style(sharing, **bearer()))
    assert r.status == 403 and (await r.json())["error"] == "blocked"
    recs = await records(tmp_path, 6)
    assert [x["status"] for x in recs] == [401, 401, 403, 403, 401, 403]
    assert {x["event"] for x in recs} == {"access.deny"}
    codes = [x.get("reason_code") for x in recs]
    assert codes == ["no_credentials", "no_credentials", None, None, "no_credentials", None]


async def test_every_identity_header_is_answered_even_empty(authz: TestClient) -> None:
    """A public route has nobody to vouch for: the names come back empty, so a proxy that
    copies them (Traefik, Envoy) replaces a client's forged copy with nothing."""
    r = await authz.get("/_jit/authz", headers=nginx_style("/healthz"))
    assert r.status == 200
    for name in ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups"):
        assert r.headers[name] == ""
    assert r.headers["X-Jitgate-Assertion"] == ""
    r = await authz.get("/_jit/authz", headers=nginx_style("/replay", **bearer("bob")))
    assert r.status == 200  # the default route: identity only
    assert r.headers["X-Forwarded-User"] == "bob" and r.headers["X-Forwarded-Email"] == ""


async def test_a_proxy_may_ask_for_redirects(authz: TestClient) -> None:
    """Traefik (?browser=redirect) and Envoy (X-Jitgate-Browser) relay a 302 to a browser."""
    r = await authz.get(
        "/_jit/authz?browser=redirect",
        headers=nginx_style(SNAPSHOTS, **BROWSER),
        allow_redirects=False,
    )
    assert r.status == 302 and r.headers["Location"] == f"/_jit/login?next={SNAPSHOTS}"
    envoy = {"X-Jitgate-Browser": "redirect", **BROWSER, **bearer()}
    r = await authz.get(f"/_jit/authz{SNAPSHOTS}", headers=envoy, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/_jit/request?scope=")
    # Envoy's query is the original request's: it asks for nothing.
    r = await authz.get(
        f"/_jit/authz{SNAPSHOTS}?browser=redirect", headers=BROWSER, allow_redirects=False
    )
    assert r.status == 401
    # Not a browser: the status and the JSON, whatever the proxy asked.
    r = await authz.get(f"/_jit/authz{SNAPSHOTS}", headers={"X-Jitgate-Browser": "redirect"})
    assert r.status == 401


async def test_the_method_decides_as_in_proxy_mode(authz: TestClient) -> None:
    """The player route takes GET and HEAD only; a POST falls to the policy's default."""
    await grant(authz)
    player = "/replay/demo-1"
    r = await authz.get("/_jit/authz", headers=nginx_style(player, "GET", **bearer()))
    assert r.status == 200
    r = await authz.get("/_jit/authz", headers=nginx_style(player, "DELETE"))
    assert r.status == 401  # the default route: identity, and there is none


async def test_traefik_and_envoy_forms(authz: TestClient, tmp_path: Path) -> None:
    await grant(authz)
    traefik = {"X-Forwarded-Uri": SNAPSHOTS + "?a=1", "X-Forwarded-Method": "GET", **bearer()}
    r = await authz.get("/_jit/authz", headers=traefik)
    assert r.status == 200 and r.headers["X-Forwarded-User"] == "alice"
    # Envoy: the original method, and the target appended to the path prefix.
    r = await authz.get(f"/_jit/authz{SNAPSHOTS}?a=1", headers=bearer())
    assert r.status == 200
    r = await authz.head(f"/_jit/authz{SNAPSHOTS}", headers=bearer())
    assert r.status == 200
    r = await authz.post("/_jit/authz/replay/demo-1", headers=bearer("bob"))
    assert r.status == 200  # the default route (identity) for a POST, as in proxy mode
    r = await authz.get(f"/_jit/authz{SNAPSHOTS}", headers=bearer("bob"))
    assert r.status == 403
    recs = await records(tmp_path, 5)
    assert [(x["method"], x["path"]) for x in recs][:3] == [("GET", SNAPSHOTS)] * 2 + [
        ("HEAD", SNAPSHOTS)
    ]


@pytest.mark.parametrize(
    ("headers", "path", "why"),
    [
        ({}, "/_jit/authz", "no original request"),
        ({"X-Original-URI": SNAPSHOTS}, "/_jit/authz", "without the original method"),
        (  # a client's X-Forwarded-Uri next to nginx's X-Original-URI: refused, not chosen
            {**nginx_style("/healthz"), "X-Forwarded-Uri": SNAPSHOTS},
            "/_jit/authz",
            "named differently by X-Original-URI, X-Forwarded-Uri",
        ),
        (
            {**nginx_style(SNAPSHOTS), "X-Forwarded-Method": "POST"},
            "/_jit/authz",
            "original method is named differently",
        ),
        (nginx_style("/healthz"), f"/_jit/authz{SNAPSHOTS}", "original URI is named differently"),
        (nginx_style(SNAPSHOTS, "get"), "/_jit/authz", "is not an HTTP method"),
        (nginx_style("http://evil.example/x"), "/_jit/authz", "must start with '/'"),
        (nginx_style("/a\u00e9"), "/_jit/authz", "outside printable ASCII"),
        (nginx_style("/_jit/authz"), "/_jit/authz", "belong to jitgate"),
        (nginx_style("/_JIT/api"), "/_jit/authz", "belong to jitgate"),
        ({**nginx_style(SNAPSHOTS), "X_Forwarded_User": "root"}, "/_jit/authz", "has '_'"),
    ],
)
async def test_requests_that_cannot_be_decided_get_400(
    authz: TestClient, headers: dict[str, str], path: str, why: str
) -> None:
    await grant(authz)
    r = await authz.get(path, headers={**headers, **bearer()})
    assert r.status == 400
    body = await r.json()
    assert body["error"] == "bad_request"
    assert why in body["reasons"][0], body


def _canonical(target: str) -> bool:
    try:
        raw_path, _ = split_target(target)
        return normalise(raw_path) == raw_path
    except BadPath:
        return False


CORPUS = sorted(
    {t for t, _ in TRICKS}
    | {raw for raw, _ in NORMALISED}
    | {raw for raw, _ in REFUSED if raw}
    | {SNAPSHOTS, SNAPSHOTS + "?x=/../../a", "/api/projects/1/session_recordings/demo-1/%C3%A9"}
)


async def test_path_corpus_one_path(authz: TestClient, tmp_path: Path) -> None:
    """Every path trick: refused (400), or decided on exactly the URI as it came.

    With a grant for demo-1, a canonical spelling of its path is allowed; any other
    spelling of it (dot segments, //, %61, lower-case escapes) is a 400, never a 200.
    """
    await grant(authz)
    token = make_token("alice")
    decided = 0
    for n, target in enumerate(CORPUS):
        headers = {
            **nginx_style(target),
            "Authorization": f"Bearer {token}",
            "User-Agent": f"corpus-{n}",
        }
        r = await authz.get("/_jit/authz", headers=headers)
        if _canonical(target):
            assert r.status in (200, 401, 403), (target, r.status)
            decided += 1
        else:
            assert r.status == 400, (target, r.status, await r.text())
    assert decided >= 3
    recs = await records(tmp_path, len(CORPUS))
    for rec in recs:
        target = CORPUS[int(rec["user_agent"].removeprefix("corpus-"))]
        if rec["status"] != 400:
            # The path decided on is the path as it came: what the proxy forwards.
            assert rec["path"] == split_target(target)[0], (target, rec)


async def test_the_path_must_be_spelled_plainly(authz: TestClient) -> None:
    """/_jit/%61uthz is routed here by its decoded form; the raw target is unclear: 400."""
    reader, writer = await asyncio.open_connection(authz.host, authz.port)
    writer.write(
        f"GET /_jit/%61uthz HTTP/1.1\r\nHost: x\r\nX-Original-URI: {SNAPSHOTS}\r\n"
        "X-Original-Method: GET\r\nConnection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert b"spell the forward-auth path as /_jit/authz" in data


async def test_untrusted_peer_is_refused(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    client = await make_proxy(
        extra="forward_auth: {enabled: true, trusted_proxies: [10.0.0.0/8, '::1/128']}"
    )
    await grant(client)
    r = await client.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **bearer()))
    assert r.status == 403
    body = await r.json()
    assert body["error"] == "untrusted_proxy"
    assert "127.0.0.1 is not in forward_auth.trusted_proxies" in body["reasons"][0]
    (rec,) = await records(tmp_path, 1)
    assert rec["event"] == "access.deny" and rec["route"] == "_untrusted"
    assert rec["status"] == 403


async def test_disabled_by_default(proxy: TestClient, upstream: Upstream) -> None:
    r = await proxy.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **bearer()))
    assert r.status == 404
    assert upstream.hits == []


async def test_redis_down_never_allows(
    own_redis: RedisServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client = await make_proxy(extra=ENABLED, redis=own_redis.url)
    await grant(client)
    headers = nginx_style(SNAPSHOTS, **bearer())
    assert (await client.get("/_jit/authz", headers=headers)).status == 200
    own_redis.kill()
    r = await client.get("/_jit/authz", headers=headers)
    assert r.status == 503
    body = await r.json()
    assert body["error"] == "unavailable" and "failing closed" in body["reasons"][0]
    assert "X-Forwarded-User" not in r.headers
    recs = await records(tmp_path, 2)
    assert recs[1]["decision"] == "unavailable" and recs[1]["status"] == 503
    own_redis.start()  # the audit queue drains at shutdown instead of waiting out its grace


async def test_strict_audit_refuses_what_cannot_be_recorded(make_proxy: ProxyFactory) -> None:
    """audit.strict: a protected decision whose record cannot be kept is a 503, never a 200."""
    client = await make_proxy(extra="  strict: true\n  spool: {max_bytes: 4KB}" + ENABLED)
    await grant(client)
    headers = nginx_style(SNAPSHOTS, **bearer())
    assert (await client.get("/_jit/authz", headers=headers)).status == 200
    for _ in range(40):  # fill the spool: each record is a few hundred bytes
        await client.get("/_jit/authz", headers=nginx_style("/static/app.css"))
    r = await client.get("/_jit/authz", headers=headers)
    assert r.status == 503
    assert "audit trail cannot be written" in (await r.json())["reasons"][-1]
    public = await client.get("/_jit/authz", headers=nginx_style("/static/app.css"))
    assert public.status == 200  # public paths carry on, as in proxy mode


async def test_client_ip_is_the_one_the_proxy_names(authz: TestClient, tmp_path: Path) -> None:
    headers = nginx_style(SNAPSHOTS, **{"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
    assert (await authz.get("/_jit/authz", headers=headers)).status == 401
    headers["X-Forwarded-For"] = "not an address"
    assert (await authz.get("/_jit/authz", headers=headers)).status == 401
    recs = await records(tmp_path, 2)
    assert [x["client_ip"] for x in recs] == ["198.51.100.7", "127.0.0.1"]


async def test_metrics_tell_forward_auth_from_proxy_mode(authz: TestClient) -> None:
    await grant(authz)
    assert (await authz.get(SNAPSHOTS, headers=bearer())).status == 200
    r = await authz.get("/_jit/authz", headers=nginx_style(SNAPSHOTS, **bearer()))
    assert r.status == 200
    text = await (await authz.get("/_jit/metrics")).text()
    assert 'jitgate_authz_requests_total{decision="allow",route="recording"} 1.0' in text
    assert 'jitgate_requests_total{decision="allow",route="recording"} 1.0' in text
    assert 'jitgate_authz_duration_seconds_count{route="recording"} 1.0' in text


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{enabled: true}", "forward_auth.trusted_proxies: is required with forward_auth.enabled"),
        ("{enabled: true, trusted_proxies: [10.0.0.1/8]}", "'10.0.0.1/8' is not a CIDR"),
        ("{enabled: true, trusted_proxies: [nginx]}", "'nginx' is not a CIDR"),
        ("{enabled: true, trusted_proxies: [0.0.0.0/0]}", "would trust every client"),
        ("{enabled: yes please}", "forward_auth.enabled"),
        ("{enabled: true, trusted_proxies: [10.0.0.5/32], path: /x}", "unknown"),
    ],
)
def test_settings_are_checked(tmp_path: Path, section: str, message: str) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(f"upstream: {{url: 'http://127.0.0.1:1'}}\nforward_auth: {section}\n{KEY}")
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    assert message in str(exc.value)
    assert "jitgate.yaml:2" in str(exc.value)


def test_settings_default_and_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:1'}\n" + KEY)
    assert load(cfg, environ={}).forward_auth.enabled is False
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\n"
        "forward_auth: {enabled: true, trusted_proxies: [10.0.0.0/8, 'fd00::/8']}\n" + KEY
    )
    fa = load(cfg, environ={}).forward_auth
    assert fa.enabled and [str(n) for n in fa.trusted_proxies] == ["10.0.0.0/8", "fd00::/8"]
