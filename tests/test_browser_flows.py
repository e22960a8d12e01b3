"""Whole flows across people in a real browser: denial, revocation, own requests, CSRF.

Headless Chromium (as in test_browser_pages.py) against `jitgate serve` in front of the demo
replay app, each person in a browser context of their own. Screenshots go to
tests/artifacts/flow-*.png.
"""

from __future__ import annotations

import re
from typing import Any

from browserkit import ARTIFACTS, launch, need_browser, playing
from conftest import make_token
from test_browser_pages import (  # noqa: F401  (jitgate: a fixture)
    BASE,
    PLAYER,
    _api,
    _open_recording,
    _sign_in,
    jitgate,
)

PENDING = re.compile(r".*/_jit/pending/(g-[0-9a-f]+)\?next=/replay/demo-1$")


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"flow-{name}.png"), full_page=True)


def test_a_denial_reaches_the_engineers_pending_page_without_a_reload(jitgate: Any) -> None:  # noqa: F811
    sync_playwright = need_browser()
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            _open_recording(erin)
            assert "Access needed" in erin.inner_text("h1")
            # The whole project needs an approver: the refusal's second form.
            erin.fill("#req-reason-2", "customer bug 7")
            erin.fill("#req-ticket-2", "SUP-7")
            erin.click("#request-form-2 button[type=submit]")
            erin.wait_for_url(PENDING)
            assert "Waiting for approval" in erin.inner_text("h1")
            pending_url = erin.url
            grant_id = _grant_id(pending_url)
            _shot(erin, "deny-1-pending")

            # Count the page loads: the script, not the test, must load the page again.
            loads: list[str] = []
            erin.on("load", lambda _page: loads.append(erin.url))
            bob = make_token("bob", groups=["approvers"])
            denied = _api(
                "POST", f"/grants/{grant_id}/deny", bob, {"comment": "use the staging copy"}
            )
            assert denied["state"] == "denied"
            erin.wait_for_selector("h1:has-text('Request denied')", timeout=15_000)
            assert loads, "the pending page changed without loading again"
            assert erin.url == pending_url
            main = erin.inner_text("main")
            assert "was denied by bob" in main
            assert "Comment: use the staging copy" in main
            assert "project:1" in erin.inner_text("[role=alert]")
            assert erin.locator("#again").is_visible()
            assert erin.locator("#waiting").count() == 0
            _shot(erin, "deny-2-denied")

            # Request again: the link leads to the request page, its form for the same scope.
            erin.click("#again")
            erin.wait_for_url(re.compile(r".*/_jit/request\?scope=project(:|%3A)1&next=.*"))
            assert erin.inner_text("h1") == "Request access"
            form = erin.locator("#request-form")
            assert "project:1" in form.inner_text()
            assert form.locator("input[name=next]").input_value() == PLAYER
            erin.fill("#req-reason", "customer bug 7, on the production copy")
            erin.fill("#req-ticket", "SUP-7")
            _shot(erin, "deny-3-again")
            erin.click("#request-form button[type=submit]")
            erin.wait_for_url(PENDING)
            assert "Waiting for approval" in erin.inner_text("h1")
            assert _grant_id(erin.url) != grant_id
        finally:
            browser.close()


def _grant_id(pending_url: str) -> str:
    match = PENDING.fullmatch(pending_url)
    assert match, pending_url
    return match.group(1)


ERIN = make_token("erin", groups=["eng"])


def _erins_active_grant() -> dict[str, Any]:
    """Give erin an automatically approved grant for demo-1 through the API."""
    grant: dict[str, Any] = _api(
        "POST", "/requests", ERIN, {"scope": "recording:1/demo-1", "reason": "replay bug"}
    )
    assert grant["state"] == "active"
    return grant


def test_an_admins_revoke_ends_access_at_the_open_tabs_next_request(jitgate: Any) -> None:  # noqa: F811
    sync_playwright = need_browser()
    grant = _erins_active_grant()
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            first = erin.goto(f"{BASE}{PLAYER}")
            assert first is not None and first.status == 200
            playing(erin)
            _shot(erin, "revoke-1-recording")

            sam = _sign_in(browser, "sam", ["security"])
            sam.goto(f"{BASE}/_jit/admin")
            row = sam.locator(f"#grant-{grant['id']}")
            assert "erin" in row.inner_text() and "recording:1/demo-1" in row.inner_text()
            row.get_by_label("Comment (optional)").fill("left the team")
            _shot(sam, "revoke-2-admin")
            row.locator("button[value=revoke]").click()
            sam.wait_for_selector(".flash.ok")
            assert sam.inner_text(".flash") == "Revoked erin's access to recording:1/demo-1."
            assert sam.locator(f"#grant-{grant['id']}").count() == 0
            _shot(sam, "revoke-3-revoked")

            # The tab erin opened under the grant: its next request (a reload) is refused.
            after = erin.reload()
            assert after is not None and after.status == 403
            assert "Access needed" in erin.inner_text("h1")
            assert "Recording demo-1" not in erin.inner_text("body")
            assert erin.locator("#player").count() == 0
            _shot(erin, "revoke-4-access-needed")
            ended = _api("GET", f"/grants/{grant['id']}", ERIN)
            assert ended["state"] == "revoked"
            assert ended["ended_by"] == "sam" and ended["end_comment"] == "left the team"
        finally:
            browser.close()


def test_an_approver_cannot_approve_their_own_request(jitgate: Any) -> None:  # noqa: F811
    sync_playwright = need_browser()
    body = {"scope": "project:1", "reason": "incident", "ticket": "INC-9"}
    own = _api("POST", "/requests", make_token("alice", groups=["eng", "approvers"]), body)
    other = _api("POST", "/requests", make_token("mallory", groups=["eng"]), body)
    assert own["state"] == other["state"] == "pending"
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            alice = _sign_in(browser, "alice", ["eng", "approvers"])
            alice.goto(f"{BASE}/_jit/approvals")
            mine = alice.locator(f"#req-{own['id']}")
            assert "alice" in mine.inner_text()
            assert "This is your own request" in mine.inner_text()
            assert mine.locator("button[value=approve]").count() == 0
            assert mine.locator("button[value=deny]").count() == 0
            assert alice.locator(f"form[action$='/approvals/{own['id']}']").count() == 0
            # Someone else's request on the same page does offer the buttons.
            theirs = alice.locator(f"#req-{other['id']}")
            assert theirs.locator("button[value=approve]").count() == 1
            _shot(alice, "own-1-approvals")

            # A form pointed at her own request is refused by the server too.
            form = theirs.locator("form.decide")
            # (form.action is its button named "action": set the attribute.)
            form.evaluate(
                "(f, id) => f.setAttribute('action', f.getAttribute('action')"
                ".replace(/[^/]+$/, id))",
                own["id"],
            )
            assert form.get_attribute("action") == f"/_jit/approvals/{own['id']}"
            form.locator("button[value=approve]").click()
            alice.wait_for_selector(".flash.error")
            assert alice.inner_text(".flash").startswith("You cannot approve your own request")
            _shot(alice, "own-2-refused")
            state = _api("GET", f"/grants/{own['id']}", make_token("sam", groups=["security"]))
            assert state["state"] == "pending" and state["approvals"] == []
        finally:
            browser.close()


def test_a_form_without_its_csrf_token_is_refused_in_the_browser(jitgate: Any) -> None:  # noqa: F811
    sync_playwright = need_browser()
    grant = _erins_active_grant()
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            form = erin.locator(f"#grant-{grant['id']} form:has(button[value=relinquish])")
            token = form.locator("input[name=csrf]")
            assert token.count() == 1 and token.get_attribute("value")
            token.evaluate("e => e.remove()")
            assert form.locator("input[name=csrf]").count() == 0
            with erin.expect_navigation() as navigation:
                form.locator("button[value=relinquish]").click()
            response = navigation.value
            assert response is not None and response.status == 403
            assert response.request.method == "POST"
            assert erin.inner_text("h1") == "You cannot do that here"
            assert "did not come from jitgate" in erin.inner_text("[role=alert]")
            _shot(erin, "csrf-1-refused")
            assert _api("GET", f"/grants/{grant['id']}", ERIN)["state"] == "active"
            erin.goto(f"{BASE}/_jit/access")
            assert erin.locator(f"#grant-{grant['id']} button[value=relinquish]").count() == 1
            _shot(erin, "csrf-2-still-active")
        finally:
            browser.close()
