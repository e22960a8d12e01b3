"""The access pages in a real browser: approved in one context, used and given up in another.

Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's sync API) talks to
jitgate running as a `jitgate serve` process in front of the demo replay app
(deploy/demo/replay_app.py), as in test_browser.py. Each person signs in through the token
form in a browser context of their own, and opens recordings from the demo's list; a
recording counts as seen once its player has loaded the events and plays them. Screenshots
of every page are written to tests/artifacts/pages-*.png.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browserkit import ARTIFACTS, demo_app, launch, need_browser, playing, serve
from conftest import demo_policy, free_port, make_token, write_config
from test_pages import POLICY_ENTITLEMENTS

PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
PLAYER = "/replay/demo-1"  # the demo's player page of demo-1: scope recording:1/demo-1


@pytest.fixture
def jitgate(redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """jitgate as a process on PORT with token sign-in, in front of the demo replay app."""
    with demo_app(tmp_path / "replay_app.log") as upstream_url:
        cfg = write_config(
            tmp_path,
            upstream_url=upstream_url,
            redis_url=redis_url,
            extra="admins: {groups: [security]}",
            policy_text=demo_policy(POLICY_ENTITLEMENTS),
        )
        with serve(cfg, PORT):
            yield cfg


def _api(method: str, path: str, token: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(
        f"{BASE}/_jit/api{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _sign_in(browser: Any, sub: str, groups: list[str], **context: Any) -> Any:
    """A browser context of its own, signed in through the token form; return its page."""
    page = browser.new_context(**context).new_page()
    page.goto(f"{BASE}/_jit/access")  # signed out: sent to sign in, and back afterwards
    page.wait_for_url(f"{BASE}/_jit/login?next=/_jit/access")
    page.fill("#token", make_token(sub, groups=groups))
    page.click("button[type=submit]")
    page.wait_for_url(f"{BASE}/_jit/access")
    return page


def _open_recording(page: Any, recording: str = "demo-1") -> None:
    """Open a recording as a user does: the demo's list of recordings, then its link."""
    page.goto(f"{BASE}/")
    assert page.inner_text("h1") == "Recordings"
    page.click(f"a[href='/replay/{recording}']")
    page.wait_for_url(f"{BASE}/replay/{recording}")


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"pages-{name}.png"), full_page=True)


def test_approve_in_one_browser_use_and_relinquish_in_another(jitgate: Path) -> None:
    sync_playwright = need_browser()
    erin_token = make_token("erin", groups=["eng"])
    request = _api(
        "POST", "/requests", erin_token,
        {"scope": "project:1", "reason": "customer bug <b>42</b>", "ticket": "INC-42"},
    )  # fmt: skip
    assert request["state"] == "pending"
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            assert "Signed in as erin" in erin.inner_text("header")
            pending = erin.inner_text("section[aria-labelledby=pending-h]")
            assert "project:1" in pending and "customer bug <b>42</b>" in pending
            _shot(erin, "access-pending")

            bob = _sign_in(browser, "bob", ["approvers"])
            bob.click("nav >> text=Approvals")
            bob.wait_for_url(f"{BASE}/_jit/approvals")
            row = bob.locator(f"#req-{request['id']}")
            assert "erin" in row.inner_text() and "INC-42" in row.inner_text()
            _shot(bob, "approvals")
            # Keyboard only: the label leads to the comment box, Tab to the Approve button.
            bob.get_by_label("Comment for erin").fill("ok for INC-42")
            bob.keyboard.press("Tab")
            bob.keyboard.press("Enter")
            bob.wait_for_selector(".flash.ok")
            assert bob.inner_text(".flash").startswith("Approved: erin has access to project:1")
            _shot(bob, "approvals-approved")

            # erin uses the grant: the demo's list, the recording, and it plays.
            _open_recording(erin)
            playing(erin)
            _shot(erin, "recording")

            erin.goto(f"{BASE}/_jit/access")
            active = erin.locator(f"#grant-{request['id']}")
            assert "project:1" in active.inner_text()
            # The script replaced the rendered minutes with a ticking countdown.
            countdown = active.locator("[data-expires]")
            first = countdown.inner_text()
            assert re.fullmatch(r"\((?:\d+:)?\d+:\d\d left\)", first), first
            erin.wait_for_function(
                "t => document.querySelector('[data-expires]').textContent !== t", arg=first
            )
            _shot(erin, "access-active")
            phone = browser.new_context(viewport={"width": 375, "height": 740})
            small = phone.new_page()
            small.context.add_cookies(erin.context.cookies(BASE))
            small.goto(f"{BASE}/_jit/access")
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, f"the page scrolls sideways at phone width ({width}px)"
            _shot(small, "access-phone")

            erin.locator(f"#grant-{request['id']} button[value=relinquish]").click()
            erin.wait_for_selector(".flash.ok")
            assert erin.inner_text(".flash") == "You gave up your access to project:1."
            assert "You hold no active grants." in erin.inner_text("main")
            history = erin.inner_text("section[aria-labelledby=history-h]")
            assert "project:1" in history and "relinquished" in history
            _shot(erin, "access-relinquished")
            assert _api("GET", f"/grants/{request['id']}", erin_token)["state"] == "relinquished"
            # Given up means gone: the recording is refused again.
            refused = erin.goto(f"{BASE}{PLAYER}")
            assert refused is not None and refused.status == 403
            assert "Access needed" in erin.inner_text("h1")

            sam = _sign_in(browser, "sam", ["security"])
            _api("POST", "/requests", erin_token, {"scope": "recording:1/demo-1", "reason": "x"})
            sam.click("nav >> text=Admin")
            sam.wait_for_url(f"{BASE}/_jit/admin")
            assert "recording:1/demo-1" in sam.inner_text("main")
            _shot(sam, "admin")
        finally:
            browser.close()
