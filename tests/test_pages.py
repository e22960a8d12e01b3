"""The access pages (My access, Approvals, Admin) over HTTP, against a real proxy and Redis.

People sign in with the token cookie, as a browser would after the token form; the
forms are posted as a browser posts them (Origin, the page's CSRF token, the button's
action), and their effect is checked through the JSON API, which shares the Workflow.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, demo_policy, make_token

from proxy.state import STATE

POLICY_ENTITLEMENTS = r"""
entitlements:
  - id: self-service
    scopes: ["recording:{project}/{recording}"]
    who: any
    durations: {offered: [5m, 15m, 1h], default: 5m, max: 1h}
    reason: required
    approval: {mode: auto}
    extend: {requires_approval: false}
  - id: break-glass
    scopes: ["project:{project}"]
    who: {groups: [oncall]}
    durations: {offered: [30m], default: 30m, max: 1h}
    approval: {mode: approvers, count: 1, approvers: {groups: [security]}}
    break_glass: true
  - id: project
    scopes: ["project:{project}"]
    who: {groups: [eng]}
    durations: {offered: [15m, 1h], default: 15m, max: 4h}
    ticket: {pattern: "^(INC|SUP)-\\d+$"}
    pending_ttl: 1h
    approval: {mode: approvers, count: 1, approvers: {groups: [approvers]}}
    extend: {requires_approval: true}
"""
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Person:
    """One browser: the token cookie it signed in with, and the flash cookie it was given."""

    def __init__(self, client: TestClient, sub: str, *groups: str) -> None:
        self.client = client
        self.sub = sub
        # A jti of its own: two people signed in as one subject hold different tokens.
        self.token = make_token(sub, groups=list(groups) or None, jti=secrets.token_hex(8))
        self.cookies = {"jitgate_token": self.token}
        self.origin = str(client.make_url("/").origin())

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def open(self, path: str) -> tuple[ClientResponse, str]:
        # The test client shares one cookie jar; each person brings their own cookies.
        self.client.session.cookie_jar.clear()
        r = await self.client.get(path, cookies=self.cookies, allow_redirects=False)
        if "jitgate_flash" in r.cookies:  # shown once: the page deletes it
            self.cookies.pop("jitgate_flash", None)
        return r, await r.text()

    async def csrf(self, path: str = "/_jit/access") -> str:
        r, text = await self.open(path)
        assert r.status in (200, 403), text
        found = CSRF.search(text)
        if found is None:  # a forged post: take a token from a page with a form
            r, text = await self.open("/_jit/access")
            found = CSRF.search(text)
        assert found, text
        return found.group(1)

    async def post(
        self,
        path: str,
        fields: dict[str, str],
        *,
        csrf: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> ClientResponse:
        """Post a form as a browser on jitgate's own page does; `csrf` None: fetch one."""
        data = dict(fields)
        # The token from the page the form is on (a page without forms has none).
        page = "/".join(path.split("/")[:3])
        data["csrf"] = csrf if csrf is not None else await self.csrf(page)
        self.client.session.cookie_jar.clear()
        r = await self.client.post(
            path,
            data=data,
            cookies=self.cookies,
            headers=headers if headers is not None else {"Origin": self.origin},
            allow_redirects=False,
        )
        if "jitgate_flash" in r.cookies:
            self.cookies["jitgate_flash"] = r.cookies["jitgate_flash"].value
        return r

    async def act(self, page: str, grant_id: str, action: str, **fields: str) -> str:
        """Submit one action through the page's form; return the flash the page then shows."""
        r = await self.post(f"/_jit/{page}/{grant_id}", {"action": action, **fields})
        assert r.status == 303, await r.text()
        r, text = await self.open(r.headers["Location"])
        assert r.status == 200, text
        found = re.search(r'<p class="flash (ok|error)"[^>]*>(.*?)</p>', text, re.S)
        assert found, text
        return f"{found.group(1)}: {found.group(2)}"

    async def request(self, scope: str, **body: Any) -> dict[str, Any]:
        body = {"scope": scope, "reason": "customer bug", **body}
        r = await self.client.post("/_jit/api/requests", json=body, headers=self.bearer)
        assert r.status == 201, await r.text()
        result: dict[str, Any] = await r.json()
        return result

    async def grant(self, grant_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/_jit/api/grants/{grant_id}", headers=self.bearer)
        assert r.status == 200, await r.text()
        result: dict[str, Any] = await r.json()
        return result


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> TestClient:
    policy = demo_policy(POLICY_ENTITLEMENTS)
    client: TestClient = await make_proxy(policy_text=policy, extra="admins: {groups: [security]}")
    return client


def people(client: TestClient) -> tuple[Person, Person, Person, Person]:
    """alice (engineer and approver), bob (approver), mallory (engineer), sam (admin)."""
    return (
        Person(client, "alice", "eng", "approvers"),
        Person(client, "bob", "approvers"),
        Person(client, "mallory", "eng"),
        Person(client, "sam", "security"),
    )


@pytest.mark.parametrize("path", ["/_jit/access", "/_jit/approvals", "/_jit/admin?user=a"])
async def test_signed_out_visitors_are_sent_to_sign_in_and_back(
    proxy: TestClient, path: str
) -> None:
    r = await proxy.get(path, allow_redirects=False)
    assert r.status == 303
    assert r.headers["Location"] == str(
        proxy.make_url("/_jit/login").with_query(next=path).relative()
    )
    assert r.headers["Cache-Control"] == "no-store"


async def test_prefix_leads_to_my_access(proxy: TestClient) -> None:
    r = await proxy.get("/_jit/", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/_jit/access"


async def test_a_signed_out_post_changes_nothing(proxy: TestClient) -> None:
    alice, *_ = people(proxy)
    g = await alice.request("recording:1/demo-1")
    r = await proxy.post(
        f"/_jit/access/{g['id']}",
        data={"action": "relinquish", "csrf": await alice.csrf()},
        headers={"Origin": alice.origin},
        allow_redirects=False,
    )
    assert r.status == 303 and r.headers["Location"].startswith("/_jit/login?next=")
    assert (await alice.grant(g["id"]))["state"] == "active"


async def test_every_page_has_chrome_csp_and_no_store(proxy: TestClient) -> None:
    alice, _, _, sam = people(proxy)
    for person, path, admin in (
        (alice, "/_jit/access", False),
        (alice, "/_jit/approvals", False),
        (sam, "/_jit/access", True),
        (sam, "/_jit/admin", True),
    ):
        r, text = await person.open(path)
        assert r.status == 200, text
        assert r.headers["Cache-Control"] == "no-store"
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert '<span class="brand">jitgate</span>' in text
        assert f"Signed in as <strong>{person.sub}</strong>" in text
        assert 'href="/_jit/logout"' in text
        assert 'href="/_jit/access"' in text and 'href="/_jit/approvals"' in text
        assert ('href="/_jit/admin"' in text) is admin
        assert ('href="/_jit/audit"' in text) is admin
        # Scripts only from files: no inline script to allow.
        assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", text))
        # Every visible control has a label.
        ids = re.findall(r'<(?:input|select|textarea)(?![^>]*type="hidden")[^>]*id="([^"]+)"', text)
        controls = re.findall(r"<(?:input|select|textarea)(?![^>]*type=\"hidden\")", text)
        assert len(ids) == len(controls)
        for control in ids:
            assert f'<label for="{control}">' in text, (path, control)


async def test_admin_page_is_for_admins_only(proxy: TestClient) -> None:
    alice, bob, _, sam = people(proxy)
    for person in (alice, bob):
        r, text = await person.open("/_jit/admin")
        assert r.status == 403
        assert "admin page is for jitgate&#39;s admins" in text
        assert r.headers["Cache-Control"] == "no-store"
    r, _ = await sam.open("/_jit/admin")
    assert r.status == 200


async def test_my_access_shows_only_my_grants_with_a_countdown(proxy: TestClient) -> None:
    alice, _, mallory, _ = people(proxy)
    mine = await alice.request("recording:1/alices-own", duration="15m")
    theirs = await mallory.request("recording:1/mallorys-own")
    pending = await alice.request("project:7", ticket="INC-1")
    r, text = await alice.open("/_jit/access")
    assert r.status == 200
    assert "recording:1/alices-own" in text and mine["id"] in text
    assert "recording:1/mallorys-own" not in text and theirs["id"] not in text
    assert "mallory" not in text
    # The expiry is plain text; the script turns the span into a live countdown.
    assert f'data-expires="{int(mine["expires_at"])}"' in text
    assert time.strftime("%H:%M:%S UTC", time.gmtime(mine["expires_at"])) in text
    assert '<script src="/_jit/static/countdown.js" defer></script>' in text
    assert "(15 min left)" in text
    # Pending requests are listed with a withdraw button, not extend or relinquish.
    section = text.split('id="pending-h"')[1].split('id="history-h"')[0]
    assert pending["id"] in section and 'value="withdraw"' in section
    assert 'value="relinquish"' not in section
    js = await proxy.get("/_jit/static/countdown.js")
    assert js.status == 200 and "data-expires" in await js.text()


async def test_relinquish_and_extend_through_the_forms(proxy: TestClient) -> None:
    alice, *_ = people(proxy)
    g = await alice.request("recording:1/demo-1", duration="5m")
    _, text = await alice.open("/_jit/access")
    # Only durations that keep the grant within its 1h maximum are offered.
    assert '<option value="300">5m</option>' in text and '<option value="900">15m</option>' in text
    assert '<option value="3600">' not in text

    flash = await alice.act("access", g["id"], "extend", duration="900", comment="more")
    assert flash.startswith("ok: Extended")
    after = await alice.grant(g["id"])
    assert after["expires_at"] == pytest.approx(g["expires_at"] + 900, abs=2)

    flash = await alice.act("access", g["id"], "extend", duration="3600")
    assert flash == "error: That would make the grant last longer than its rule allows."
    assert (await alice.grant(g["id"]))["expires_at"] == after["expires_at"]

    flash = await alice.act("access", g["id"], "relinquish", comment="done")
    assert flash == "ok: You gave up your access to recording:1/demo-1."
    assert (await alice.grant(g["id"]))["state"] == "relinquished"
    _, text = await alice.open("/_jit/access")
    history = text.split('id="history-h"')[1]
    assert "recording:1/demo-1" in history and "relinquished" in history
    # Post/Redirect/Get: the message is shown once.
    assert 'class="flash' not in text


async def test_extending_where_approval_is_needed_files_a_request(proxy: TestClient) -> None:
    alice, bob, *_ = people(proxy)
    g = await alice.request("project:3", ticket="SUP-9")
    assert (await bob.act("approvals", g["id"], "approve")).startswith("ok: Approved")
    _, text = await alice.open("/_jit/access")
    assert ">Request extension</button>" in text

    flash = await alice.act("access", g["id"], "extend", duration="3600", comment="still on it")
    assert flash == "ok: Extension by 1h requested; it needs approval."
    _, text = await alice.open("/_jit/access")
    assert "An extension by 1h is waiting for approval." in text
    _, text = await bob.open("/_jit/approvals")
    assert f"extension of {g['id']}" in text and "asks for 1h more" in text


async def test_approve_and_deny_with_a_comment(proxy: TestClient) -> None:
    alice, bob, mallory, _ = people(proxy)
    first = await mallory.request("project:1", ticket="INC-42", duration="1h")
    second = await mallory.request("project:2", ticket="INC-43")
    r, text = await bob.open("/_jit/approvals")
    assert r.status == 200
    for g in (first, second):
        row = text.split(f'id="req-{g["id"]}"')[1].split("</article>")[0]
        assert "<strong>mallory</strong> asks for 1h" in row or g is second
        assert g["scope"] in row and "INC-4" in row and "customer bug" in row
        assert 'value="approve"' in row and 'value="deny"' in row
        assert f'<label for="c-{g["id"]}">Comment for mallory</label>' in row

    flash = await bob.act("approvals", first["id"], "approve", comment="looks <fine>")
    assert (
        flash
        == "ok: Approved: mallory has access to project:1 until "
        + time.strftime(
            "%H:%M:%S UTC", time.gmtime((await mallory.grant(first["id"]))["expires_at"])
        )
        + "."
    )
    done = await mallory.grant(first["id"])
    assert done["state"] == "active"
    assert [(a["by"], a["comment"]) for a in done["approvals"]] == [("bob", "looks <fine>")]

    flash = await bob.act("approvals", second["id"], "deny", comment="no ticket context")
    assert flash == "ok: Denied mallory&#39;s request for project:2."
    denied = await mallory.grant(second["id"])
    assert denied["state"] == "denied" and denied["end_comment"] == "no ticket context"
    _, text = await bob.open("/_jit/approvals")
    assert first["id"] not in text and second["id"] not in text
    # A second decision on a decided request: a friendly message, nothing changes.
    await alice.request("recording:1/demo-1")
    flash = await alice.act("approvals", second["id"], "approve")
    assert flash == "error: That request has already been decided, withdrawn or has lapsed."


async def test_an_approver_cannot_approve_their_own_request(proxy: TestClient) -> None:
    alice, *_ = people(proxy)
    await alice.request("recording:1/demo-1")  # a form on My access, for a token to forge with
    g = await alice.request("project:1", ticket="INC-42")
    _, text = await alice.open("/_jit/approvals")
    row = text.split(f'id="req-{g["id"]}"')[1].split("</article>")[0]
    assert "This is your own request" in row
    assert 'value="approve"' not in row and "<form" not in row
    # A forged post with a valid token: the Workflow refuses it.
    flash = await alice.act("approvals", g["id"], "approve")
    assert flash == "error: You cannot approve your own request; another approver must decide it."
    assert (await alice.grant(g["id"]))["state"] == "pending"


async def test_break_glass_review_through_the_form(proxy: TestClient) -> None:
    _, bob, _, sam = people(proxy)
    oscar = Person(proxy, "oscar", "oncall")
    g = await oscar.request("project:9", break_glass=True)
    assert g["state"] == "active"
    _, text = await bob.open("/_jit/approvals")  # not a security approver
    assert g["id"] not in text
    _, text = await sam.open("/_jit/approvals")
    row = text.split(f'id="rev-{g["id"]}"')[1].split("</article>")[0]
    assert "<strong>oscar</strong> used break-glass access" in row and 'value="review"' in row
    flash = await sam.act("approvals", g["id"], "review", comment="incident INC-7, fine")
    assert flash == "ok: Review recorded for oscar&#39;s break-glass access to project:9."
    reviewed = await sam.grant(g["id"])
    assert (reviewed["reviewed_by"], reviewed["review_comment"]) == ("sam", "incident INC-7, fine")
    _, text = await sam.open("/_jit/approvals")
    assert f'id="rev-{g["id"]}"' not in text


async def test_admin_page_lists_break_glass_awaiting_review_and_reviews_it(
    proxy: TestClient,
) -> None:
    alice, _, _, sam = people(proxy)
    oscar = Person(proxy, "oscar", "oncall")
    g = await oscar.request("project:9", break_glass=True)
    own = await Person(proxy, "sam", "security", "oncall").request("project:8", break_glass=True)
    _, text = await sam.open("/_jit/admin")
    reviews = text.split('id="review-h"')[1]
    row = reviews.split(f'id="rev-{g["id"]}"')[1].split("</article>")[0]
    assert "<strong>oscar</strong> used break-glass access" in row
    assert f'action="/_jit/admin/{g["id"]}"' in row and 'value="review"' in row
    mine = reviews.split(f'id="rev-{own["id"]}"')[1].split("</article>")[0]
    assert "someone else must review it" in mine and "<form" not in mine
    flash = await sam.act("admin", g["id"], "review", comment="checked INC-7")
    assert flash == "ok: Review recorded for oscar&#39;s break-glass access to project:9."
    reviewed = await sam.grant(g["id"])
    assert (reviewed["reviewed_by"], reviewed["review_comment"]) == ("sam", "checked INC-7")
    _, text = await sam.open("/_jit/admin")
    assert f'id="rev-{g["id"]}"' not in text and f'id="rev-{own["id"]}"' in text
    # Not an admin: no admin page, and no review through its form.
    token = await alice.csrf("/_jit/request?scope=recording:1/demo-1")
    r = await alice.post(f"/_jit/admin/{own['id']}", {"action": "review"}, csrf=token)
    assert r.status == 303
    _, text = await alice.open(r.headers["Location"])
    assert "for jitgate&#39;s admins" in text
    assert not (await sam.grant(own["id"]))["reviewed_by"]


async def test_admin_filters_and_revokes(proxy: TestClient) -> None:
    alice, bob, mallory, sam = people(proxy)
    a = await alice.request("recording:1/demo-1", duration="5m")
    b = await bob.request("recording:2/demo-2", duration="1h")
    m = await mallory.request("recording:1/demo-3", duration="15m")
    _, text = await sam.open("/_jit/admin")
    assert all(g["id"] in text for g in (a, b, m)) and "3 of 3 active grants" in text
    _, text = await sam.open("/_jit/admin?user=ALI")
    assert a["id"] in text and b["id"] not in text and m["id"] not in text
    _, text = await sam.open("/_jit/admin?scope=recording:1/")
    assert a["id"] in text and m["id"] in text and b["id"] not in text
    _, text = await sam.open("/_jit/admin?within=900")
    assert a["id"] in text and m["id"] in text and b["id"] not in text
    assert '<option value="900" selected>' in text

    # Revoking keeps the filters the admin was looking at.
    token = CSRF.search(text)
    assert token
    r = await sam.post(
        f"/_jit/admin/{m['id']}",
        {"action": "revoke", "comment": "left the team", "f_within": "900", "f_user": ""},
        csrf=token.group(1),
    )
    assert r.status == 303 and r.headers["Location"] == "/_jit/admin?within=900"
    r, text = await sam.open(r.headers["Location"])
    assert "Revoked mallory&#39;s access to recording:1/demo-3." in text
    assert m["id"] not in text.split("</form>", 1)[1]
    revoked = await sam.grant(m["id"])
    assert (revoked["state"], revoked["ended_by"], revoked["end_comment"]) == (
        "revoked", "sam", "left the team",
    )  # fmt: skip


@pytest.mark.parametrize("case", ["missing", "wrong", "other-user", "other-token", "expired"])
async def test_a_missing_or_wrong_csrf_token_is_refused(proxy: TestClient, case: str) -> None:
    alice, _, mallory, _ = people(proxy)
    g = await alice.request("recording:1/demo-1")
    good = await alice.csrf()
    issued, _, mac = good.partition(".")
    if case == "missing":
        token = ""
    elif case == "wrong":
        token = f"{issued}.{'0' * len(mac)}"
    elif case == "other-user":  # the attacker's own valid token
        await mallory.request("recording:1/demo-1")
        token = await mallory.csrf()
    elif case == "other-token":  # alice, but signed in with another token (another browser)
        token = await Person(proxy, "alice", "eng", "approvers").csrf()
        assert token != good
    else:  # made with the real key for alice's credential, but a day old
        key = await _csrf_key(proxy)
        old = str(int(time.time()) - 86400)
        binding = "cookie|alice|" + hashlib.sha256(alice.token.encode()).hexdigest()
        assert hmac.new(key, f"csrf|{binding}|{issued}".encode(), "sha256").hexdigest() == mac
        token = f"{old}.{hmac.new(key, f'csrf|{binding}|{old}'.encode(), 'sha256').hexdigest()}"
    r = await alice.post(f"/_jit/access/{g['id']}", {"action": "relinquish"}, csrf=token)
    assert r.status == 403
    assert "nothing was changed" in await r.text()
    assert (await alice.grant(g["id"]))["state"] == "active"


async def _csrf_key(client: TestClient) -> bytes:
    raw = await client.app[STATE].redis.get("jit:csrf:key")
    assert raw is not None
    return raw if isinstance(raw, bytes) else str(raw).encode()


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}],
    ids=["origin", "fetch-site", "none"],
)
async def test_a_cross_site_form_is_refused(proxy: TestClient, headers: dict[str, str]) -> None:
    alice, *_ = people(proxy)
    g = await alice.request("recording:1/demo-1")
    token = await alice.csrf()
    r = await alice.post(
        f"/_jit/access/{g['id']}", {"action": "relinquish"}, csrf=token, headers=headers
    )
    assert r.status == 403
    assert "Cross-site form refused" in await r.text()
    assert (await alice.grant(g["id"]))["state"] == "active"
    # The same token from jitgate's own origin works: only the origin was wrong.
    r = await alice.post(f"/_jit/access/{g['id']}", {"action": "relinquish"}, csrf=token)
    assert r.status == 303


async def test_a_page_only_does_its_own_actions(proxy: TestClient) -> None:
    alice, _, mallory, _ = people(proxy)
    await alice.request("recording:1/demo-1")  # a form on My access, for a token to forge with
    g = await mallory.request("project:5", ticket="INC-5")
    # An approver's "withdraw" of someone else's request on My access is refused...
    flash = await alice.act("access", g["id"], "withdraw")
    assert flash == "error: Only the holder of that grant may do that."
    # ...and an action another page offers is not taken here.
    r = await alice.post(f"/_jit/access/{g['id']}", {"action": "approve"})
    assert r.status == 403
    assert (await mallory.grant(g["id"]))["state"] == "pending"
    flash = await mallory.act("access", g["id"], "withdraw")
    assert flash == "ok: Withdrawn: your request for project:5."
    assert (await mallory.grant(g["id"]))["state"] == "denied"


async def test_output_is_escaped(proxy: TestClient) -> None:
    _, bob, mallory, sam = people(proxy)
    evil = '<script>alert("x")</script>'
    g = await mallory.request("project:1", ticket="INC-1", reason=evil)
    a = await mallory.request("recording:1/demo-1", reason=evil)
    for person, path in ((bob, "/_jit/approvals"), (mallory, "/_jit/access"), (sam, "/_jit/admin")):
        _, text = await person.open(path)
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text, path
        assert "<script>alert" not in text
    assert g["id"] and a["id"]


async def test_a_flash_is_shown_only_to_its_browser(proxy: TestClient) -> None:
    alice, bob, *_ = people(proxy)
    g = await alice.request("recording:1/demo-1")
    r = await alice.post(f"/_jit/access/{g['id']}", {"action": "relinquish"})
    bob.cookies["jitgate_flash"] = r.cookies["jitgate_flash"].value
    _, text = await bob.open("/_jit/access")
    assert "You gave up" not in text
    bob.cookies["jitgate_flash"] = "W1wib2tcIiwgXCJmb3JnZWRcIl0.00"
    _, text = await bob.open("/_jit/access")
    assert 'class="flash' not in text
    _, text = await alice.open("/_jit/access")
    assert "You gave up your access to recording:1/demo-1." in text
