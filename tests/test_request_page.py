"""Requesting access from the refusal page, over HTTP against a real proxy and Redis.

The refusal carries a form for each scope the visitor may request, and links to
`{prefix}/request?scope=…&next=…`, which has the same form. The form posts to
`{prefix}/request` (origin and CSRF checked, then Workflow.request) and ends on `next`
when the grant is active at once, or on `{prefix}/pending/{id}` while it waits.
"""

from __future__ import annotations

import html
import re
import time

from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, Upstream, demo_policy
from test_pages import CSRF, POLICY_ENTITLEMENTS, Person, people
from test_pages import proxy as pages_proxy
from yarl import URL

from proxy.state import STATE

RECORDING = "/api/projects/1/session_recordings/demo-1"
# The pages' proxy: an auto rule (recording:…) and an approvers rule with a ticket pattern
# (project:…).
proxy = pages_proxy
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


async def _form(person: Person, scope: str, next_: str = RECORDING) -> str:
    r, text = await person.open(str(URL("/_jit/request").with_query(scope=scope, next=next_)))
    assert r.status == 200, text
    assert r.headers["Cache-Control"] == "no-store"
    return text


async def _submit(person: Person, scope: str, next_: str = RECORDING, **fields: str) -> str:
    """Post the form as the browser would; return the Location it was sent to."""
    text = await _form(person, scope, next_)
    token = CSRF.search(text)
    assert token, text
    r = await person.post(
        "/_jit/request", {"scope": scope, "next": next_, **fields}, csrf=token.group(1)
    )
    assert r.status == 303, await r.text()
    return r.headers["Location"]


async def test_refusal_links_to_the_form_which_offers_the_rules_choices(proxy: TestClient) -> None:
    alice, *_ = people(proxy)
    r = await proxy.get(RECORDING, headers=HTML, cookies=alice.cookies)
    assert r.status == 403
    page = await r.text()
    link = html.unescape(re.search(r'id="request-access" href="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    url = URL(link)
    assert url.path == "/_jit/request"
    assert url.query["scope"] == "recording:1/demo-1" and url.query["next"] == RECORDING

    text = await _form(alice, "project:1")
    form = text.split('id="request-form"')[1].split("</form>")[0]
    assert "Under <strong>project</strong>" in form and "needs 1 approval" in form
    assert '<option value="900" selected>15m</option><option value="3600">1h</option>' in form
    assert "<code>^(INC|SUP)-\\d+$</code>" in form
    assert 'pattern="(INC|SUP)-\\d+" required' in form
    assert f'name="next" value="{RECORDING}"' in form and 'name="scope" value="project:1"' in form
    # Every visible control has a label.
    for control in re.findall(r'<(?:input|select)(?![^>]*type="hidden")[^>]*id="([^"]+)"', form):
        assert f'<label for="{control}">' in form

    auto = (await _form(alice, "recording:1/demo-1")).split('id="request-form"')[1]
    assert "granted at once" in auto and "Reason (required)" in auto
    assert '<option value="300" selected>5m</option>' in auto and "Ticket (optional)" in auto


def _forms(page: str) -> list[str]:
    return [part.split("</form>")[0] for part in page.split('<form method="post"')[1:]]


async def test_the_refusal_itself_offers_a_form_for_each_scope_one_may_request(
    proxy: TestClient, upstream: Upstream
) -> None:
    _, bob, mallory, _ = people(proxy)
    # mallory (eng) may take the recording at once, or ask for the whole project.
    r = await proxy.get(RECORDING, headers=HTML, cookies=mallory.cookies)
    assert r.status == 403 and "form-action 'self'" in r.headers["Content-Security-Policy"]
    page = await r.text()
    own, wide = _forms(page)
    assert 'href="/_jit/access"' in page and "Signed in as <strong>mallory</strong>" in page
    assert "(and a ticket where asked)" in page
    assert 'id="request-form"' in own and 'name="scope" value="recording:1/demo-1"' in own
    assert "granted at once" in own and 'id="req-reason"' in own
    assert 'id="request-form-2"' in wide and 'name="scope" value="project:1"' in wide
    assert 'pattern="(INC|SUP)-\\d+" required' in wide and 'id="req-ticket-2"' in wide
    for form in (own, wide):
        assert f'name="next" value="{RECORDING}"' in form
        for control in re.findall(
            r'<(?:input|select)(?![^>]*type="hidden")[^>]*id="([^"]+)"', form
        ):
            assert f'<label for="{control}">' in form
    # The refusal's token is mallory's own: posting the form files the request.
    token = CSRF.search(own).group(1)  # type: ignore[union-attr]
    fields = {"scope": "recording:1/demo-1", "next": RECORDING, "reason": "bug 8"}
    r = await mallory.post("/_jit/request", fields, csrf=token)
    assert r.status == 303 and r.headers["Location"] == RECORDING
    r, _ = await mallory.open(RECORDING)
    assert r.status == 200 and RECORDING in upstream.paths()

    # bob is not in eng: only the recording's rule admits him.
    page = await (await proxy.get(RECORDING, headers=HTML, cookies=bob.cookies)).text()
    (only,) = _forms(page)
    assert "ticket where asked" not in page
    assert 'name="scope" value="recording:1/demo-1"' in only
    # Not signed in: a sign-in link and no form; an API client gets JSON without one.
    r = await proxy.get(RECORDING, headers=HTML)
    assert r.status == 401 and _forms(await r.text()) == []
    r = await proxy.get(RECORDING, headers={"Accept": "application/json"}, cookies=bob.cookies)
    assert r.status == 403 and "csrf" not in await r.text()


async def test_a_request_already_waiting_is_shown_instead_of_a_second_form(
    proxy: TestClient,
) -> None:
    _, bob, mallory, _ = people(proxy)
    where = await _submit(mallory, "project:1", reason="outage", ticket="INC-9", duration="3600")
    grant_id = URL(where).path.rsplit("/", 1)[1]
    page = await (await proxy.get(RECORDING, headers=HTML, cookies=mallory.cookies)).text()
    (own,) = _forms(page)  # the recording's form; the project's is the waiting request
    assert 'name="scope" value="recording:1/demo-1"' in own
    waiting = page.split('id="request-form-2"')[1].split("</section>")[0]
    assert "waiting for approval (0 of 1)" in waiting and "outage" in waiting
    follow = html.unescape(re.search(r'href="([^"]+)"', waiting).group(1))  # type: ignore[union-attr]
    assert follow == str(URL(f"/_jit/pending/{grant_id}").with_query(next=RECORDING))
    text = await _form(mallory, "project:1")
    assert 'id="request-form"' in text and "Follow your request" in text and "<form" not in text
    # A second request for the same scope is refused, by the form and by the API alike.
    token = CSRF.search(own).group(1)  # type: ignore[union-attr]
    fields = {"scope": "project:1", "next": RECORDING, "reason": "again", "ticket": "INC-9"}
    r = await mallory.post("/_jit/request", fields, csrf=token)
    assert r.status == 409 and "already waiting for approval" in await r.text()
    body = {"scope": "project:1", "reason": "again", "ticket": "INC-9"}
    r = await proxy.post("/_jit/api/requests", json=body, headers=mallory.bearer)
    assert r.status == 409 and (await r.json())["error"] == "already_pending"
    r = await proxy.get("/_jit/api/grants/mine", headers=mallory.bearer)
    assert [g["id"] for g in (await r.json())["grants"]] == [grant_id]
    # Once it is decided, the form is back.
    r = await proxy.post(f"/_jit/api/grants/{grant_id}/deny", json={}, headers=bob.bearer)
    assert r.status == 200, await r.text()
    page = await (await proxy.get(RECORDING, headers=HTML, cookies=mallory.cookies)).text()
    assert len(_forms(page)) == 2 and "Follow your request" not in page


async def test_no_form_when_no_rule_admits_the_visitor(make_proxy: ProxyFactory) -> None:
    policy = demo_policy(POLICY_ENTITLEMENTS.replace("who: any", "who: {groups: [support]}"))
    client: TestClient = await make_proxy(policy_text=policy)
    _, bob, *_ = people(client)  # bob is not in eng, which the project's rule asks for
    r = await client.get(RECORDING, headers=HTML, cookies=bob.cookies)
    page = await r.text()
    assert r.status == 403 and _forms(page) == [] and 'id="request-access"' in page


async def test_auto_approval_goes_straight_back_to_the_recording(
    proxy: TestClient, upstream: Upstream
) -> None:
    _, _, mallory, _ = people(proxy)
    r = await proxy.get(RECORDING, headers=HTML, cookies=mallory.cookies)
    assert r.status == 403
    where = await _submit(mallory, "recording:1/demo-1", reason="bug 7", duration="900")
    assert where == RECORDING
    r, _ = await mallory.open(where)
    assert r.status == 200 and RECORDING in upstream.paths()
    r = await proxy.get("/_jit/api/grants/mine", headers=mallory.bearer)
    (grant,) = (await r.json())["grants"]
    assert grant["state"] == "active" and grant["duration"] == 900 and grant["reason"] == "bug 7"


async def test_approval_required_waits_on_the_pending_page_then_continues(
    proxy: TestClient, upstream: Upstream
) -> None:
    _, bob, mallory, _ = people(proxy)
    where = await _submit(mallory, "project:1", reason="outage", ticket="INC-9", duration="3600")
    url = URL(where)
    assert url.path.startswith("/_jit/pending/") and url.query["next"] == RECORDING
    grant_id = url.path.rsplit("/", 1)[1]
    r, text = await mallory.open(where)
    assert r.status == 200, text
    assert "Waiting for approval" in text and 'data-state="pending"' in text
    assert '<script src="/_jit/static/pending.js" defer></script>' in text
    assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
    assert 'id="check"' in text and "INC-9" in text
    # Only its requester (or an approver or admin) sees it.
    r, _ = await Person(proxy, "eve", "eng").open(where)
    assert r.status == 404
    assert (await proxy.get(RECORDING, cookies=mallory.cookies)).status == 403

    r = await proxy.post(f"/_jit/api/grants/{grant_id}/approve", json={}, headers=bob.bearer)
    assert r.status == 200, await r.text()
    r, text = await mallory.open(where)
    assert "Access granted" in text and 'data-state="active"' in text
    assert f'id="continue" href="{RECORDING}"' in text
    r, _ = await mallory.open(RECORDING)
    assert r.status == 200 and upstream.paths().count(RECORDING) == 1
    js = await proxy.get("/_jit/static/pending.js")
    assert js.status == 200 and "data-api" in await js.text()


async def test_denial_and_lapse_are_shown_with_a_way_to_ask_again(proxy: TestClient) -> None:
    _, bob, mallory, _ = people(proxy)
    denied = await _submit(mallory, "project:1", reason="a", ticket="INC-1")
    grant_id = URL(denied).path.rsplit("/", 1)[1]
    r = await proxy.post(
        f"/_jit/api/grants/{grant_id}/deny", json={"comment": "not <now>"}, headers=bob.bearer
    )
    assert r.status == 200
    _, text = await mallory.open(denied)
    assert "Request denied" in text and "was denied by bob" in text
    assert "Comment: not &lt;now&gt;" in text
    again = URL(html.unescape(re.search(r'id="again" href="([^"]+)"', text).group(1)))  # type: ignore[union-attr]
    assert again.path == "/_jit/request" and again.query["scope"] == "project:1"
    assert again.query["next"] == RECORDING
    assert "<noscript>" not in text

    lapsing = await _submit(mallory, "project:2", reason="b", ticket="SUP-2")
    grant_id = URL(lapsing).path.rsplit("/", 1)[1]
    settings = proxy.app[STATE].settings
    await proxy.app[STATE].redis.hset(
        f"{settings.redis.key_prefix}grant:{grant_id}", "pending_until", str(time.time() - 1)
    )
    _, text = await mallory.open(lapsing)
    assert "Request lapsed" in text and "nobody decided it in time" in text
    assert 'id="again"' in text


async def test_workflow_errors_come_back_on_the_form_with_the_values(proxy: TestClient) -> None:
    _, _, mallory, _ = people(proxy)
    text = await _form(mallory, "project:1")
    token = CSRF.search(text).group(1)  # type: ignore[union-attr]
    fields = {"scope": "project:1", "next": RECORDING, "reason": "why <b>me</b>"}
    for extra, status, message in (
        ({"ticket": "JIRA-1", "duration": "900"}, 400, "A ticket matching ^(INC|SUP)-\\d+$ is"),
        ({"ticket": "INC-1", "duration": "7200"}, 400, "Duration must be one of 15m, 1h."),
    ):
        r = await mallory.post("/_jit/request", {**fields, **extra}, csrf=token)
        assert r.status == status
        page = await r.text()
        assert message in html.unescape(page)
        assert 'value="why &lt;b&gt;me&lt;/b&gt;"' in page and "<b>me" not in page
        assert f'value="{extra["ticket"]}"' in page
    r = await mallory.post("/_jit/request", {**fields, "scope": "org:1"}, csrf=token)
    assert r.status == 403
    assert "No entitlement lets mallory request access to org:1." in await r.text()
    r = await mallory.post(
        "/_jit/request", {"scope": "recording:1/demo-1", "reason": " "}, csrf=token
    )
    assert r.status == 400 and "A reason is required." in await r.text()
    r = await proxy.get("/_jit/api/grants/mine", headers=mallory.bearer)
    assert (await r.json())["grants"] == []


async def test_forged_or_cross_site_posts_create_nothing(proxy: TestClient) -> None:
    alice, _, mallory, _ = people(proxy)
    fields = {"scope": "recording:1/demo-1", "reason": "x", "next": RECORDING}
    stolen = CSRF.search(await _form(alice, "recording:1/demo-1")).group(1)  # type: ignore[union-attr]
    own = CSRF.search(await _form(mallory, "recording:1/demo-1")).group(1)  # type: ignore[union-attr]
    for token, headers in (
        ("", {"Origin": mallory.origin}),
        ("123.abc", {"Origin": mallory.origin}),
        (stolen, {"Origin": mallory.origin}),
        (own, {"Origin": "https://evil.example"}),
    ):
        r = await mallory.post("/_jit/request", fields, csrf=token, headers=headers)
        assert r.status == 403, (token, headers)
    r = await proxy.get("/_jit/api/grants/mine", headers=mallory.bearer)
    assert (await r.json())["grants"] == []
    # Signed out: to sign in, and nothing is filed.
    r = await proxy.post("/_jit/request", data=fields, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/_jit/login?next=")


async def test_an_open_redirect_next_ends_on_the_site_root(proxy: TestClient) -> None:
    _, _, mallory, _ = people(proxy)
    text = await _form(mallory, "recording:1/demo-1", "//evil.com")
    assert 'name="next" value="/"' in text
    where = await _submit(mallory, "recording:1/demo-2", "//evil.com", reason="x")
    assert where == "/"
    pending = await _submit(mallory, "project:1", "/\\evil.com", reason="x", ticket="INC-1")
    assert URL(pending).query["next"] == "/"
    _, text = await mallory.open(str(URL(pending).with_query(next="https://evil.com/")))
    assert 'data-next="/"' in text and "evil" not in text


async def test_signed_out_visitors_see_the_rules_and_a_sign_in_link(proxy: TestClient) -> None:
    r = await proxy.get("/_jit/request", params={"scope": "project:1", "next": RECORDING})
    text = await r.text()
    assert r.status == 200 and 'id="request-form"' not in text
    link = html.unescape(re.search(r'href="(/_jit/login[^"]+)"', text).group(1))  # type: ignore[union-attr]
    back = URL(URL(link).query["next"])
    assert back.path == "/_jit/request" and back.query["next"] == RECORDING
