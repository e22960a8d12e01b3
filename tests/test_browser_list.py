"""The demo app's list page (deploy/demo/static/list.js) in a real browser: what a lock says.

Headless Chromium (Debian's, see tests/browserkit.py) loads a page with the demo's rows and
its real list.js, whose list API answers as jitgate's `lists: annotate` does: one recording
open, one locked for want of a grant, one locked by a sensitivity rule.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from browserkit import ARTIFACTS, launch, need_browser, upstream
from conftest import ROOT

LIST_JS = (ROOT / "deploy" / "demo" / "static" / "list.js").read_bytes()
BILLING = "this recording includes /billing/* (sensitivity rule 'billing')"
LIST = {
    "results": [
        {"id": "demo-1"},
        {"id": "demo-2", "jitgate": {"locked": True, "scope": "recording:1/demo-2",
                                     "request_url": "/_jit/request?scope=recording:1/demo-2"}},
        {"id": "demo-3", "jitgate": {"locked": True, "scope": "recording:1/demo-3",
                                     "request_url": None, "reason": BILLING}},
    ]
}  # fmt: skip
PAGE = "".join(
    f'<tr data-recording="{rid}"><td>{rid}</td></tr>' for rid in ("demo-1", "demo-2", "demo-3")
)
PAGE = f'<table>{PAGE}</table><script src="/list.js" data-list="/list"></script>'


class _App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        kind, body = {
            "/": ("text/html", PAGE.encode()),
            "/list.js": ("text/javascript", LIST_JS),
            "/list": ("application/json", json.dumps(LIST).encode()),
        }.get(self.path, ("text/plain", b""))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_lock_says_why_and_offers_a_request_only_where_one_helps() -> None:
    sync_playwright = need_browser()
    with upstream(_App) as base, sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("body[data-list-checked]")
            rows = {
                rid: page.locator(f'tr[data-recording="{rid}"]')
                for rid in ("demo-1", "demo-2", "demo-3")
            }
            assert rows["demo-1"].locator(".lock").count() == 0
            plain = rows["demo-2"]
            title = plain.locator(".lock").get_attribute("title")
            assert title == "No access to recording:1/demo-2"
            assert plain.locator(".lock-reason").count() == 0
            assert plain.locator("a.request").get_attribute("href") == (
                "/_jit/request?scope=recording:1/demo-2"
            )
            sensitive = rows["demo-3"]
            assert sensitive.locator(".lock").get_attribute("title") == BILLING
            assert sensitive.locator(".lock-reason").inner_text() == BILLING
            assert sensitive.locator("a.request").count() == 0
            page.screenshot(path=str(ARTIFACTS / "list-reasons.png"))
        finally:
            browser.close()
