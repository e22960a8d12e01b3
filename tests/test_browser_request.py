"""Requesting access in a real browser: refused, the form, waiting, and on to the recording.

Headless Chromium (as in test_browser_pages.py) against `jitgate serve`. The form is
filled in on the refusal page itself (test_browser_flows.py takes the refusal's link to
the request page instead). Screenshots go to
tests/artifacts/request-*.png.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from browserkit import ARTIFACTS, CHROMIUM, need_browser
from conftest import make_token
from test_browser_pages import BASE, _api, _sign_in, jitgate  # noqa: F401  (a fixture)

RECORDING = "/api/projects/1/session_recordings/demo-1"


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"request-{name}.png"), full_page=True)


def test_refused_request_wait_and_continue_without_reload(jitgate: Path) -> None:  # noqa: F811
    sync_playwright = need_browser()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            # project:1 is wider than the recording: its rule needs an approver.
            erin.goto(f"{BASE}/api/projects/1/session_recordings/")
            assert "Access needed" in erin.inner_text("h1")
            assert "project:1" in erin.inner_text("main")
            # The form is on the refusal itself.
            _shot(erin, "refused")
            assert erin.input_value("input[name=next]") == "/api/projects/1/session_recordings/"
            options = erin.locator("#req-duration option").all_inner_texts()
            assert options == ["15m", "1h"]
            erin.fill("#req-reason", "customer bug <b>42</b>")
            erin.fill("#req-ticket", "nope")
            erin.click("#request-form button[type=submit]")
            # The browser checks the pattern before anything is sent.
            assert erin.evaluate("document.querySelector('#req-ticket').validity.patternMismatch")
            assert erin.url == f"{BASE}/api/projects/1/session_recordings/"  # not sent
            erin.fill("#req-ticket", "INC-42")
            erin.select_option("#req-duration", "3600")
            _shot(erin, "form")
            erin.click("#request-form button[type=submit]")
            erin.wait_for_url(re.compile(r".*/_jit/pending/g-[0-9a-f]+\?next=.*"))
            assert "Waiting for approval" in erin.inner_text("h1")
            assert "customer bug <b>42</b>" in erin.inner_text("main")
            _shot(erin, "pending")
            grant_id = erin.url.split("/_jit/pending/")[1].split("?")[0]

            bob = make_token("bob", groups=["approvers"])
            _api("POST", f"/grants/{grant_id}/approve", bob, {"comment": "ok"})
            # No reload: the page's script sees the approval and continues to the recording.
            erin.wait_for_url(f"{BASE}/api/projects/1/session_recordings/", timeout=15_000)
            assert "Recording demo-1" in erin.inner_text("h1")
            _shot(erin, "continued")
        finally:
            browser.close()


def test_auto_approval_goes_straight_back_in_the_browser(jitgate: Path) -> None:  # noqa: F811
    sync_playwright = need_browser()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            erin = _sign_in(browser, "erin", ["eng"])
            erin.goto(f"{BASE}{RECORDING}")
            assert "Access needed" in erin.inner_text("h1")
            # Two forms: this recording (at once) and the project that covers it (approval).
            assert "project:1" in erin.inner_text("#request-form-2")
            assert "granted at once" in erin.inner_text("#request-form")
            erin.click("#request-form button[type=submit]")  # the reason is required
            assert erin.evaluate("document.querySelector('#req-reason').validity.valueMissing")
            erin.fill("#req-reason", "debugging a replay")
            erin.click("#request-form button[type=submit]")
            erin.wait_for_url(f"{BASE}{RECORDING}")
            assert "Recording demo-1" in erin.inner_text("h1")
            _shot(erin, "auto-continued")
        finally:
            browser.close()
