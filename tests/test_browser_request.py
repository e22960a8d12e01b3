"""Requesting access in a real browser: refused, the form, waiting, and on to the recording.

Headless Chromium (as in test_browser_pages.py) against `jitgate serve` in front of the demo
replay app. erin opens a recording from the demo's list, is refused, and fills in a form on
the refusal page itself (test_browser_flows.py also takes a denied request's link to the
request page); once granted she is back on the player, which plays the recording.
Screenshots go to tests/artifacts/request-*.png.
"""

from __future__ import annotations

import re
from pathlib import Path
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


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"request-{name}.png"), full_page=True)


def test_refused_request_wait_and_continue_without_reload(jitgate: Path) -> None:  # noqa: F811
    sync_playwright = need_browser()
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            _open_recording(erin)
            assert "Access needed" in erin.inner_text("h1")
            # The forms are on the refusal itself. The second asks for project:1, which
            # covers the recording and is wider than it: its rule needs an approver.
            project = erin.locator("#request-form-2")
            assert "project:1" in project.inner_text()
            _shot(erin, "refused")
            assert project.locator("input[name=next]").input_value() == PLAYER
            options = erin.locator("#req-duration-2 option").all_inner_texts()
            assert options == ["15m", "1h"]
            erin.fill("#req-reason-2", "customer bug <b>42</b>")
            erin.fill("#req-ticket-2", "nope")
            erin.click("#request-form-2 button[type=submit]")
            # The browser checks the pattern before anything is sent.
            assert erin.evaluate("document.querySelector('#req-ticket-2').validity.patternMismatch")
            assert erin.url == f"{BASE}{PLAYER}"  # not sent
            erin.fill("#req-ticket-2", "INC-42")
            erin.select_option("#req-duration-2", "3600")
            _shot(erin, "form")
            erin.click("#request-form-2 button[type=submit]")
            erin.wait_for_url(re.compile(r".*/_jit/pending/g-[0-9a-f]+\?next=/replay/demo-1$"))
            assert "Waiting for approval" in erin.inner_text("h1")
            assert "customer bug <b>42</b>" in erin.inner_text("main")
            _shot(erin, "pending")
            grant_id = erin.url.split("/_jit/pending/")[1].split("?")[0]

            bob = make_token("bob", groups=["approvers"])
            _api("POST", f"/grants/{grant_id}/approve", bob, {"comment": "ok"})
            # No reload: the page's script sees the approval and continues to the recording.
            erin.wait_for_url(f"{BASE}{PLAYER}", timeout=15_000)
            playing(erin)
            _shot(erin, "continued")
        finally:
            browser.close()


def test_auto_approval_goes_straight_back_in_the_browser(jitgate: Path) -> None:  # noqa: F811
    sync_playwright = need_browser()
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            _open_recording(erin)
            assert "Access needed" in erin.inner_text("h1")
            # Two forms: this recording (at once) and the project that covers it (approval).
            assert "project:1" in erin.inner_text("#request-form-2")
            assert "granted at once" in erin.inner_text("#request-form")
            erin.click("#request-form button[type=submit]")  # the reason is required
            assert erin.evaluate("document.querySelector('#req-reason').validity.valueMissing")
            erin.fill("#req-reason", "debugging a replay")
            # Granted at once: from the refusal at PLAYER back to PLAYER, now the player.
            with erin.expect_navigation(url=f"{BASE}{PLAYER}") as back:
                erin.click("#request-form button[type=submit]")
            response = back.value
            assert response is not None and response.status == 200
            assert response.request.redirected_from is not None  # through POST /_jit/request
            playing(erin)
            _shot(erin, "auto-continued")
        finally:
            browser.close()
