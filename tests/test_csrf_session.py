"""CSRF tokens of browsers signed in through OIDC: bound to the session, not only the person.

People sign in through the real IdP (tests/idp) with the scripted browser of
tests/oidckit.py, so the credential is a real `jitgate_session` cookie made by
proxy/identity/session.py, in either store (the default encrypted cookie, and Redis). Forms are
posted as a browser posts them (Origin, the page's CSRF token, the button's action), and
their effect is checked through the JSON API, which shares the Workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import bearer
from idp import Idp
from oidckit import HTML, browser, sign_in
from test_oidc_login import BASE, idp, start  # noqa: F401  (fixtures)
from test_pages import CSRF
from yarl import URL

from proxy.state import STATE

SAME_ORIGIN = {"Origin": BASE}
GATED = "/dashboard"  # an identity route (the default): a signed-out navigation goes to the IdP


@dataclass
class Gate:
    client: TestClient[web.Request, web.Application]
    store: str  # where its sessions live: cookie (the default) or redis


@pytest.fixture(params=["cookie", "redis"])
async def gate(request: pytest.FixtureRequest, start: Any) -> Gate:  # noqa: F811
    """jitgate with OIDC sign-in, its sessions in the default cookie store or in Redis."""
    store: str = request.param
    return Gate(await start(session="" if store == "cookie" else "store: redis"), store)


async def signed_in(gate: Gate, idp: Idp, user: str) -> aiohttp.ClientSession:  # noqa: F811
    """A new browser signed in as `user` through the IdP, its session in the gate's store."""
    s = browser()
    assert await sign_in(s, idp, BASE, GATED, user) == GATED
    await check_store(gate, s)
    return s


async def check_store(gate: Gate, s: aiohttp.ClientSession) -> None:
    """The browser's session is where the gate's store keeps it (so both stores are tested)."""
    sid = s.cookie_jar.filter_cookies(URL(BASE))["jitgate_session"].value
    keys = await gate.client.app[STATE].redis.keys("jit:session:*")
    if gate.store == "redis":
        assert len(sid) == 43 and keys, "the session is not in Redis"
    else:
        assert sid.startswith("gAAAAA") and not keys, "the session is not an encrypted cookie"


async def new_grant(user: str, scope: str = "recording:1/demo-1") -> str:
    """Request an auto-approved grant through the API (bearer); return its id."""
    async with aiohttp.ClientSession() as api:
        body = {"scope": scope, "reason": "customer bug"}
        async with api.post(f"{BASE}/_jit/api/requests", json=body, headers=bearer(user)) as r:
            assert r.status == 201, await r.text()
            grant = await r.json()
    assert grant["state"] == "active"
    return str(grant["id"])


async def state(user: str, grant_id: str) -> str:
    async with (
        aiohttp.ClientSession() as api,
        api.get(f"{BASE}/_jit/api/grants/{grant_id}", headers=bearer(user)) as r,
    ):
        assert r.status == 200, await r.text()
        return str((await r.json())["state"])


async def access_token(s: aiohttp.ClientSession, user: str) -> str:
    """Open My access as the browser's session; return its CSRF token."""
    async with s.get(f"{BASE}/_jit/access", headers=HTML, allow_redirects=False) as r:
        text = await r.text()
        assert r.status == 200, text
    assert f"Signed in as <strong>{user}</strong>" in text
    found = CSRF.search(text)
    assert found, text
    return found.group(1)


async def relinquish(s: aiohttp.ClientSession, grant_id: str, token: str) -> tuple[int, str]:
    """Post My access's relinquish form from jitgate's own origin; return status and body."""
    async with s.post(
        f"{BASE}/_jit/access/{grant_id}",
        data={"action": "relinquish", "comment": "done", "csrf": token},
        headers=SAME_ORIGIN,
        allow_redirects=False,
    ) as r:
        return r.status, await r.text()


def refused(status: int, text: str) -> bool:
    return status == 403 and "did not come from jitgate: nothing was changed" in text


async def test_a_session_token_on_its_own_session_changes_state(gate: Gate, idp: Idp) -> None:  # noqa: F811
    grant_id = await new_grant("alice")
    async with await signed_in(gate, idp, "alice") as s:
        token = await access_token(s, "alice")
        # The form is there for this grant, and without the token nothing happens.
        async with s.get(f"{BASE}/_jit/access", headers=HTML) as r:
            assert f'action="/_jit/access/{grant_id}"' in await r.text()
        assert refused(*await relinquish(s, grant_id, ""))
        assert await state("alice", grant_id) == "active"
        # With the page's token, from jitgate's own origin: done.
        status, _ = await relinquish(s, grant_id, token)
        assert status == 303
        assert await state("alice", grant_id) == "relinquished"
        async with s.get(f"{BASE}/_jit/access", headers=HTML) as r:
            assert "You gave up your access to recording:1/demo-1." in await r.text()


async def test_a_token_is_bound_to_one_sign_in(gate: Gate, idp: Idp) -> None:  # noqa: F811
    grant_id = await new_grant("alice")
    async with await signed_in(gate, idp, "alice") as first:
        old = await access_token(first, "alice")
        # The same person, signed in a second time in another browser: a new binding.
        async with await signed_in(gate, idp, "alice") as second:
            other = await access_token(second, "alice")
            assert other != old
            assert refused(*await relinquish(second, grant_id, old))
            assert await state("alice", grant_id) == "active"
            assert refused(*await relinquish(first, grant_id, other))
            assert await state("alice", grant_id) == "active"

        # Signed out, then in again in the first browser: its old token is refused too.
        logout = f"{BASE}/_jit/logout"
        async with first.post(logout, headers=SAME_ORIGIN, allow_redirects=False) as r:
            assert r.status == 303
        assert await sign_in(first, idp, BASE, GATED, "alice") == GATED  # no session: to the IdP
        await check_store(gate, first)
        assert refused(*await relinquish(first, grant_id, old))
        assert await state("alice", grant_id) == "active"
        # The new sign-in's own token works: only the binding was wrong before.
        status, _ = await relinquish(first, grant_id, await access_token(first, "alice"))
        assert status == 303
        assert await state("alice", grant_id) == "relinquished"


async def test_another_users_session_token_is_refused(gate: Gate, idp: Idp) -> None:  # noqa: F811
    mine = await new_grant("alice")
    await new_grant("bob", "recording:1/demo-2")  # a form on bob's My access
    async with await signed_in(gate, idp, "bob") as bob:
        bobs = await access_token(bob, "bob")
    async with await signed_in(gate, idp, "alice") as alice:
        # bob's valid token (the attacker's own), posted by alice's browser.
        assert refused(*await relinquish(alice, mine, bobs))
        assert await state("alice", mine) == "active"
        status, _ = await relinquish(alice, mine, await access_token(alice, "alice"))
        assert status == 303
        assert await state("alice", mine) == "relinquished"
