"""README's whole loop in a real browser against `make demo`: blocked, request, approve,
watch, expire. Also: the status bar is on the player page and not on the recording's JSON.

The demo runs as `make demo` runs it (deploy/demo/launch.py with config/jitgate.yaml, its
own redis-server and the demo replay app). The one change: the policy's shortest
project-wide duration is 10 seconds instead of 5 minutes, so the test can watch the grant
expire. Headless Chromium clicks through what README tells a new user to do; screenshots
go to tests/artifacts/demo-*.png.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from browserkit import ARTIFACTS, launch, need_browser
from conftest import ROOT
from test_demo_walkthrough import SNAPSHOTS, cli, running_demo
from waiting import eventually_sync

SECONDS = 10


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"demo-{name}.png"), full_page=True)


def _sign_in(page: Any, token: str, then: str) -> None:
    """On jitgate's sign-in page: paste the token and come back to `then`."""
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(then)


def test_the_whole_loop_in_a_browser_against_the_demo(tmp_path: Path) -> None:
    sync_playwright = need_browser()
    policy = (ROOT / "config" / "policy.yaml").read_text()
    short = policy.replace("offered: [5m, 15m, 1h, 4h]", f"offered: [{SECONDS}s, 15m, 1h, 4h]")
    assert short != policy, "the demo policy's project-wide durations changed"
    (tmp_path / "policy.yaml").write_text(short)
    with running_demo(JITGATE_POLICY__FILE=str(tmp_path / "policy.yaml")) as (base, env):
        alice_token = cli(env, "token", "mint", "--sub", "alice", "--groups", "eng")
        bob_token = cli(env, "token", "mint", "--sub", "bob", "--groups", "approvers")
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                alice = browser.new_context().new_page()
                # Signed out: the list asks for a sign-in, which comes back to it.
                alice.goto(f"{base}/")
                assert "Sign-in required" in alice.inner_text("h1")
                alice.click("text=Sign in")
                _sign_in(alice, alice_token, f"{base}/")
                assert "Recordings" in alice.inner_text("h1")

                # Blocked: the player page of a recording is "Access needed", with forms.
                alice.click("a[href='/replay/demo-1']")
                alice.wait_for_url(f"{base}/replay/demo-1")
                assert "Access needed" in alice.inner_text("h1")
                assert "recording:1/demo-1" in alice.inner_text("#request-form")
                assert "project:1" in alice.inner_text("#request-form-2")
                _shot(alice, "1-blocked")

                # Request the whole project, with a ticket, for the shortest time.
                alice.fill("#req-reason-2", "checkout fails for a customer")
                alice.fill("#req-ticket-2", "INC-42")
                alice.select_option("#req-duration-2", label=f"{SECONDS}s")
                alice.click("#request-form-2 button[type=submit]")
                alice.wait_for_url(re.compile(r".*/_jit/pending/g-[0-9a-f]+\?next=/replay/demo-1"))
                assert "Waiting for approval" in alice.inner_text("h1")
                grant_id = alice.url.split("/_jit/pending/")[1].split("?")[0]
                _shot(alice, "2-pending")

                # Approve: bob in a browser of his own (README: a private window).
                bob = browser.new_context().new_page()
                bob.goto(f"{base}/_jit/approvals")
                _sign_in(bob, bob_token, f"{base}/_jit/approvals")
                row = bob.locator(f"#req-{grant_id}")
                assert "alice" in row.inner_text() and "INC-42" in row.inner_text()
                _shot(bob, "3-approvals")
                row.locator("button[value=approve]").click()
                bob.wait_for_selector(".flash.ok")

                # Watch: alice's waiting tab goes on to the recording by itself, and plays it.
                alice.wait_for_url(f"{base}/replay/demo-1", timeout=15_000)
                alice.wait_for_selector("#status.ok", timeout=15_000)
                assert "events" in alice.inner_text("#status")
                bar = alice.locator("#jitgate-statusbar")
                assert bar.is_visible() and "left" in bar.inner_text()
                _shot(alice, "4-watching")
                # The recording's JSON, under the same grant, is left as the app sent it.
                data = alice.goto(f"{base}{SNAPSHOTS}")
                assert data is not None and data.status == 200
                assert data.headers["content-type"].startswith("application/json")
                assert b"jitgate" not in data.body() and json.loads(data.body())["snapshots"]

                # Expire: once the grant's time is up, the same page is refused again.
                (grant,) = json.loads(cli(env, "grants", "list", "--user", "alice", "--json"))
                assert grant["id"] == grant_id and grant["state"] == "active"

                def refused() -> bool:
                    alice.goto(f"{base}/replay/demo-1")
                    return "Access needed" in alice.inner_text("h1")

                eventually_sync(
                    refused,
                    within=max(0.0, grant["expires_at"] - time.time()) + 15,
                    interval=0.25,
                    what="the page to be refused at the grant's end",
                )
                _shot(alice, "5-expired")
                # My access: no longer active, and in the history as expired.
                alice.goto(f"{base}/_jit/access")
                assert alice.locator(f"#grant-{grant_id}").count() == 0
                history = alice.inner_text("section[aria-labelledby=history-h] tbody")
                assert re.search(r"project:1\s+expired", history), history
                _shot(alice, "6-history")
            finally:
                browser.close()


def test_the_list_shows_locks_until_a_grant() -> None:
    """With the demo policy's `lists: annotate`, the list page marks what alice may not open:
    a lock and a link to request access, gone while she holds a grant and back after its
    revocation."""
    sync_playwright = need_browser()
    with running_demo() as (base, env):
        token = cli(env, "token", "mint", "--sub", "alice", "--groups", "eng")
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                page = browser.new_context().new_page()
                page.goto(f"{base}/")
                page.click("text=Sign in")
                _sign_in(page, token, f"{base}/")

                def locks() -> dict[str, bool]:
                    page.goto(f"{base}/")
                    page.wait_for_selector("body[data-list-checked]")
                    rows = page.locator("tr[data-recording]")
                    return {
                        rows.nth(i).get_attribute("data-recording") or "": (
                            rows.nth(i).locator(".lock").count() == 1
                        )
                        for i in range(rows.count())
                    }

                locked = locks()
                assert len(locked) >= 2 and all(locked.values()), locked
                row = page.locator("tr[data-recording='demo-1']")
                link = row.locator("a.request")
                assert link.inner_text() == "Request access"
                assert link.get_attribute("href") == "/_jit/request?scope=recording:1/demo-1"
                _shot(page, "list-locked")

                grant_id = cli(
                    env, "grants", "add", "--user", "alice", "--scope", "recording:1/demo-1",
                    "--ttl", "5m", "--reason", "ticket 42",
                )  # fmt: skip
                opened = locks()
                assert opened == {**locked, "demo-1": False}
                assert page.locator("tr[data-recording='demo-1'] a.request").count() == 0
                _shot(page, "list-granted")

                cli(env, "grants", "revoke", grant_id)
                assert locks() == locked
                # The link leads to jitgate's request page for that recording.
                page.click("tr[data-recording='demo-1'] a.request")
                page.wait_for_url(re.compile(r".*/_jit/request\?scope=recording:1/demo-1"))
                assert "recording:1/demo-1" in page.inner_text("main")
            finally:
                browser.close()
