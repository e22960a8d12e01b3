"""OIDC browser sign-in through jitgate against a real provider (tests/idp), scripted with aiohttp.

jitgate listens on a port chosen before the IdP starts, because the IdP must know the
redirect URI (and the post-logout one) of its client up front.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest
from aiohttp.test_utils import TestClient
from conftest import Upstream, bearer, check_audit_file, free_port
from cryptography.fernet import Fernet
from idp import Idp, idp_fixture
from oidckit import (
    HTML,
    KEY_1,
    SNAPSHOTS,
    authorize_url,
    browser,
    oidc_config,
    sign_in,
    start_login,
)
from waiting import eventually

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.state import STATE

PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
CALLBACK = f"{BASE}/_jit/oidc/callback"
AFTER_LOGOUT = f"{BASE}/_jit/login"
idp = idp_fixture("idp", scope="module", redirect_uris=[CALLBACK, AFTER_LOGOUT])


@pytest.fixture
async def start(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream, redis_url: str, idp: Idp
) -> AsyncIterator[Any]:
    """Start jitgate with OIDC sign-in on PORT; keyword args add session or oidc fields."""
    clients: list[TestClient] = []

    async def factory(*, session: str = "", oidc: str = "") -> TestClient:
        cfg = oidc_config(
            tmp_path, idp=idp, base=BASE, upstream_url=upstream.url, redis_url=redis_url,
            session=session, oidc=oidc,
        )  # fmt: skip
        app = build_app(settings_mod.load(cfg, environ={}))
        client: TestClient = await aiohttp_client(app, server_kwargs={"port": PORT})
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()
    check_audit_file(tmp_path / "audit.jsonl")


def audit_events(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_sign_in_session_grant_and_sign_out(
    start: Any, upstream: Upstream, idp: Idp, tmp_path: Path
) -> None:
    proxy = await start()
    await proxy.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "test", "pytest")
    async with browser() as s:
        # A browser without a session goes to the IdP and comes back where it started.
        auth = await start_login(s, BASE, SNAPSHOTS + "?t=3")
        q = parse_qs(urlsplit(auth).query)
        assert auth.startswith(idp.issuer + "/auth?")
        assert q["client_id"] == ["jitgate"] and q["redirect_uri"] == [CALLBACK]
        assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
        assert len(q["state"][0]) >= 43 and len(q["nonce"][0]) >= 43
        assert q["scope"] == ["openid email groups"]
        callback = await idp.sign_in(s, auth, CALLBACK, "alice")
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == SNAPSHOTS + "?t=3"
            head = r.headers.getall("Set-Cookie")
        session_cookie = next(h for h in head if h.startswith("jitgate_session="))
        attrs = {a.strip().split("=")[0].lower() for a in session_cookie.split(";")[1:]}
        assert {"httponly", "path", "max-age"} <= attrs
        assert "samesite=lax" in session_cookie.lower()
        assert "secure" not in attrs  # only because public_url is http on loopback here
        # The state cookie is spent.
        assert any(h.startswith("jitgate_oidc=;") or 'jitgate_oidc=""' in h for h in head)

        # The session is the identity: the recording (under the grant), an identity route.
        async with s.get(BASE + SNAPSHOTS, headers=HTML) as r:
            assert r.status == 200
        sent = upstream.hits[-1][2]
        assert "jitgate_session" not in sent.get("Cookie", "")
        async with s.get(BASE + "/dashboard", headers=HTML) as r:
            assert r.status == 200
        async with s.get(BASE + "/_jit/api/grants/mine") as r:
            assert r.status == 200
            assert [g["user"] for g in (await r.json())["grants"]] == ["alice"]
        # A state change on the session's strength must be same-origin.
        body = {"scope": "recording:1/demo-2", "reason": "checking ticket 42", "duration": "15m"}
        async with s.post(BASE + "/_jit/api/requests", json=body) as r:
            assert r.status == 403 and (await r.json())["error"] == "cross_site"
        async with s.post(BASE + "/_jit/api/requests", json=body, headers={"Origin": BASE}) as r:
            assert r.status == 201, await r.text()
        # Bearer tokens keep working next to sessions, and win over them.
        async with s.get(BASE + "/_jit/api/grants/mine", headers=bearer("bob")) as r:
            assert (await r.json())["grants"] == []

        # Sign-out: a GET only asks; the POST must be same-origin.
        async with s.get(BASE + "/_jit/logout") as r:
            assert r.status == 200 and "alice" in await r.text()
            assert idp.issuer in r.headers["Content-Security-Policy"]  # form-action
        async with s.post(BASE + "/_jit/logout", allow_redirects=False) as r:
            assert r.status == 403
        async with s.post(
            BASE + "/_jit/logout", headers={"Origin": BASE}, allow_redirects=False
        ) as r:
            assert r.status == 303
            end = r.headers["Location"]
        meta = await idp.discovery()
        assert end.startswith(meta["end_session_endpoint"] + "?")
        q = parse_qs(urlsplit(end).query)
        assert q["post_logout_redirect_uri"] == [AFTER_LOGOUT] and q["client_id"] == ["jitgate"]
        assert q["id_token_hint"][0].count(".") == 2
        # jitgate's session is gone at once...
        async with s.get(BASE + SNAPSHOTS, headers=HTML, allow_redirects=False) as r:
            assert r.status == 302
        # ...and the IdP ends its own after its confirmation, then sends the browser back.
        landed = await _confirm_idp_logout(s, end)
        assert landed == AFTER_LOGOUT
        async with s.get(landed) as r:
            assert r.status == 200 and 'id="sso"' in await r.text()
        # The IdP asks for a login again (no silent sign-in from its old session).
        auth = await start_login(s, BASE, "/dashboard")
        async with s.get(auth) as r:
            assert r.status == 200 and 'name="login"' in await r.text()
    await proxy.close()
    events = [e["event"] for e in audit_events(tmp_path)]
    assert "session.started" in events and "session.ended" in events


async def _confirm_idp_logout(s: Any, end: str) -> str:
    async with s.get(end) as r:
        page = await r.text()
        assert r.status == 200, page
    from idp import _form

    form = _form(page)
    assert form.action is not None
    async with s.post(
        urljoin(end, form.action), data={**form.fields, "logout": "yes"}, allow_redirects=False
    ) as r:
        assert r.status in (302, 303)
        return str(r.headers["Location"])


# Where each return URL ends after a complete sign-in: always a path on jitgate itself.
OPEN_REDIRECTS = {
    "//evil.com": "/",
    "/\\evil.com": "/",
    "/%2F%2Fevil.com": "/",
    "/%2f%2fevil.com": "/",
    "/%5Cevil.com": "/",
    "https://evil.com": "/",
    "/\t/evil.com": "/",
    "/%09/evil.com": "/",
    "/\n/evil.com": "/",
    "javascript:alert(1)": "/",
    "\\\\evil.com": "/",
    "/..//evil.com": "/evil.com",  # dot segments resolved: a path on jitgate, not a host
    "/_jit/oidc/login?next=//evil.com": "/",  # no sign-in loops
    "/dashboard?t=3": "/dashboard?t=3",
}


async def test_return_url_never_leaves_the_site(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        for evil, expected in OPEN_REDIRECTS.items():
            login = f"{BASE}/_jit/oidc/login?{urlencode({'next': evil})}"
            auth = await authorize_url(s, login)
            callback = await idp.sign_in(s, auth, CALLBACK, "alice")
            async with s.get(callback, allow_redirects=False) as r:
                assert r.status == 303, evil
                where = r.headers["Location"]
            assert where == expected, (evil, where)
            assert urlsplit(urljoin(BASE + "/x", where)).netloc == f"127.0.0.1:{PORT}"


async def test_return_url_is_checked_when_stored_and_again_when_used(start: Any, idp: Idp) -> None:
    await start()
    fernet = Fernet(KEY_1.encode())
    async with browser() as s:
        await authorize_url(s, f"{BASE}/_jit/oidc/login?next=//evil.com")
        cookie = s.cookie_jar.filter_cookies(_url(CALLBACK))["jitgate_oidc"].value
        [[state, nonce, verifier, stored, expires]] = json.loads(fernet.decrypt(cookie.encode()))
        assert stored == "/"  # checked before it is stored
        # A state cookie naming another site (as if the first check had failed) still
        # leads home: the path is checked again before the redirect.
        forged = [[state, nonce, verifier, "//evil.com", expires]]
        s.cookie_jar.update_cookies(
            {"jitgate_oidc": fernet.encrypt(json.dumps(forged).encode()).decode()},
            response_url=_url(BASE + "/_jit/"),
        )
        meta = await idp.discovery()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        auth = meta["authorization_endpoint"] + "?" + urlencode(
            {
                "client_id": "jitgate", "response_type": "code", "scope": "openid",
                "redirect_uri": CALLBACK, "state": state, "nonce": nonce,
                "code_challenge": challenge.rstrip(b"=").decode(),
                "code_challenge_method": "S256",
            }
        )  # fmt: skip
        callback = await idp.sign_in(s, auth, CALLBACK, "alice")
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"


async def test_callback_without_or_with_a_wrong_state_is_refused(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        async with s.get(CALLBACK + "?code=abc", allow_redirects=False) as r:
            assert r.status == 400 and "no state" in await r.text()
            assert "jitgate_session" not in r.cookies
        auth = await start_login(s, BASE, "/dashboard")
        callback = await idp.sign_in(s, auth, CALLBACK, "alice")
        wrong = callback.replace("state=", "state=x")
        async with s.get(wrong, allow_redirects=False) as r:
            assert r.status == 400 and "unknown or already used" in await r.text()
            assert "jitgate_session" not in r.cookies
        # The right state still works once...
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 303
        # ...and never twice: the state was consumed.
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 400 and "unknown or already used" in await r.text()


async def test_replayed_callback_with_the_old_state_cookie_is_refused(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        auth = await start_login(s, BASE, "/dashboard")
        state_cookie = s.cookie_jar.filter_cookies(_url(CALLBACK))["jitgate_oidc"].value
        callback = await idp.sign_in(s, auth, CALLBACK, "alice")
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 303
    # An attacker who copied both the state cookie and the callback URL: the IdP refuses
    # the code a second time, so no session is made.
    async with browser() as other:
        other.cookie_jar.update_cookies(
            {"jitgate_oidc": state_cookie}, response_url=_url(BASE + "/_jit/")
        )
        async with other.get(callback, allow_redirects=False) as r:
            assert r.status == 401
            assert "token endpoint refused the code: invalid_grant" in await r.text()
            assert "jitgate_session" not in r.cookies


async def test_state_from_another_browser_is_refused(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as victim, browser() as attacker:
        auth = await start_login(attacker, BASE, "/dashboard")
        callback = await idp.sign_in(attacker, auth, CALLBACK, "mallory")
        # Login CSRF: the attacker's callback, delivered in the victim's browser.
        async with victim.get(callback, allow_redirects=False) as r:
            assert r.status == 400
            assert "jitgate_session" not in r.cookies


async def test_expired_state_is_refused(start: Any, idp: Idp) -> None:
    await start(oidc="login_timeout: 1")
    async with browser() as s:
        auth = await start_login(s, BASE, "/dashboard")
        callback = await idp.sign_in(s, auth, CALLBACK, "alice")
        # Intended: past login_timeout, the subject of the test. Not polled: the callback
        # can be tried once only, and the wait starts after the login did.
        await asyncio.sleep(1.3)
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status in (400, 401)
            assert "jitgate_session" not in r.cookies


async def test_code_issued_to_another_client_is_refused(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        auth = await start_login(s, BASE, "/dashboard")
        # Same state, nonce, PKCE challenge and redirect URI, but another client's code.
        other = auth.replace("client_id=jitgate&", "client_id=jitgate-es256&")
        assert other != auth
        callback = await idp.sign_in(s, other, CALLBACK, "alice")
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 401
            assert "token endpoint refused the code" in await r.text()
            assert "jitgate_session" not in r.cookies


async def test_id_token_for_another_nonce_is_refused(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        auth = await start_login(s, BASE, "/dashboard")
        nonce = parse_qs(urlsplit(auth).query)["nonce"][0]
        # Everything else is this sign-in's, but the ID token will carry another nonce.
        other = auth.replace(f"nonce={nonce}", "nonce=replayed-from-elsewhere")
        assert other != auth
        callback = await idp.sign_in(s, other, CALLBACK, "alice")
        async with s.get(callback, allow_redirects=False) as r:
            assert r.status == 401
            assert "nonce does not match" in await r.text()
            assert "jitgate_session" not in r.cookies


async def test_provider_error_and_foreign_issuer_are_refused(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        auth = await start_login(s, BASE, "/dashboard")
        state = parse_qs(urlsplit(auth).query)["state"][0]
        async with s.get(f"{CALLBACK}?error=access_denied&state={state}") as r:
            assert r.status == 401 and "refused the sign-in: access_denied" in await r.text()
        auth = await start_login(s, BASE, "/dashboard")
        callback = await idp.sign_in(s, auth, CALLBACK, "alice")
        mixed = callback.replace(urlencode({"iss": idp.issuer}), "iss=https%3A%2F%2Fevil.example")
        assert mixed != callback
        async with s.get(mixed, allow_redirects=False) as r:
            assert r.status == 401 and "another issuer" in await r.text()


async def test_tampered_session_cookie_is_no_session(start: Any, idp: Idp) -> None:
    await start()
    async with browser() as s:
        assert await sign_in(s, idp, BASE, "/dashboard") == "/dashboard"
        good = s.cookie_jar.filter_cookies(_url(BASE))["jitgate_session"].value
    flipped = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    for bad in (flipped, good[:-4], "x", "gAAAAA" + "A" * 200, good[::-1]):
        async with browser() as s:
            s.cookie_jar.update_cookies({"jitgate_session": bad}, response_url=_url(BASE))
            async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
                assert r.status == 302, bad  # back to sign-in, not a 500
                assert r.cookies["jitgate_session"].value == ""  # and the cookie is cleared
            async with s.get(BASE + "/_jit/api/grants/mine") as r:
                assert r.status == 401
    async with browser() as s:
        s.cookie_jar.update_cookies({"jitgate_session": good}, response_url=_url(BASE))
        async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
            assert r.status == 200


async def test_idle_timeout_ends_the_session(start: Any, idp: Idp) -> None:
    await start(session="max_age: 30, idle_timeout: 2")
    async with browser() as s:
        await sign_in(s, idp, BASE, "/dashboard")
        # Intended sleeps: the session's lifetimes are what is under test.
        for _ in range(3):  # kept alive by use, past the idle timeout in total
            await asyncio.sleep(1.1)
            async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
                assert r.status == 200
        # Idle past idle_timeout since the last use. Not polled: each look would be a use.
        await asyncio.sleep(2.3)
        async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
            assert r.status == 302


async def test_absolute_lifetime_ends_the_session_in_use(start: Any, idp: Idp) -> None:
    await start(session="max_age: 3, idle_timeout: 2")
    async with browser() as s:
        await sign_in(s, idp, BASE, "/dashboard")
        for _ in range(2):  # intended sleeps: the absolute lifetime is under test
            await asyncio.sleep(1.2)
            async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
                assert r.status == 200

        async def ended() -> int | None:  # in use all along: each look is a use
            async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
                return None if r.status == 200 else r.status

        assert await eventually(ended, interval=0.1, what="the session to reach max_age") == 302


async def test_redis_session_store(start: Any, idp: Idp, redis_url: str) -> None:
    proxy = await start(session="store: redis")
    async with browser() as s:
        await sign_in(s, idp, BASE, "/dashboard")
        sid = s.cookie_jar.filter_cookies(_url(BASE))["jitgate_session"].value
        assert len(sid) == 43  # only a random id in the cookie
        from conftest import RedisServer  # noqa: F401 (the type of redis_server)

        redis = proxy.app[STATE].redis
        keys = [k.decode() for k in await redis.keys("jit:session:*")]
        assert len(keys) == 1 and sid not in keys[0]  # stored under a hash of the id
        assert b"alice" not in (await redis.get(keys[0]))  # and encrypted
        async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
            assert r.status == 200
        async with s.post(BASE + "/_jit/logout", headers={"Origin": BASE}, allow_redirects=False):
            pass
        assert await redis.keys("jit:session:*") == []
    async with browser() as s:  # a made-up id of the right shape is no session
        s.cookie_jar.update_cookies({"jitgate_session": "A" * 43}, response_url=_url(BASE))
        async with s.get(BASE + "/dashboard", headers=HTML, allow_redirects=False) as r:
            assert r.status == 302


async def test_login_page_offers_sso_and_the_gate_sends_only_navigations(start: Any) -> None:
    proxy = await start()
    r = await proxy.get("/_jit/login", params={"next": "/dashboard"})
    text = await r.text()
    assert 'href="/_jit/oidc/login?next=/dashboard"' in text and 'name="token"' in text
    # An API client, a POST and a bearer token still get 401, not a redirect.
    r = await proxy.get(SNAPSHOTS, allow_redirects=False)
    assert r.status == 401
    r = await proxy.post("/dashboard", headers=HTML, allow_redirects=False)
    assert r.status == 401
    r = await proxy.get(
        "/dashboard",
        headers={**HTML, "Authorization": "Bearer nope"},
        allow_redirects=False,
    )
    assert r.status == 401


def _url(base: str) -> Any:
    from yarl import URL

    return URL(base)
