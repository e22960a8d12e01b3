"""A real browser: headless Chromium signs in through the real IdP, views a recording, signs out.

Playwright's sync API drives Debian's chromium (/usr/bin/chromium; Playwright's own
browser downloads are never used). jitgate runs as a process (`jitgate serve`), as in
production, so nothing here shares pytest's event loop, in front of the demo replay app
(deploy/demo/replay_app.py), whose player page plays the recording once it is granted.
Screenshots of the key pages are written to tests/artifacts/.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from browserkit import ARTIFACTS, JITGATE, demo_app, launch, need_browser, playing, serve
from conftest import free_port
from idp import Idp, idp_fixture
from oidckit import oidc_config

PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
AFTER_LOGOUT = f"{BASE}/_jit/login"
idp = idp_fixture("idp", scope="module", redirect_uris=[f"{BASE}/_jit/oidc/callback", AFTER_LOGOUT])
PLAYER = "/replay/demo-1"  # the demo's player page of demo-1: scope recording:1/demo-1


@pytest.fixture
def jitgate(idp: Idp, redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """jitgate as a process on PORT with OIDC sign-in, in front of the demo replay app."""
    with demo_app(tmp_path / "replay_app.log") as upstream_url:
        cfg = oidc_config(
            tmp_path, idp=idp, base=BASE, redis_url=redis_url, upstream_url=upstream_url
        )
        with serve(cfg, PORT):
            yield cfg


def test_chromium_signs_in_views_a_recording_and_signs_out(jitgate: Path, idp: Idp) -> None:
    sync_playwright = need_browser()
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page()
            # No session: the recording's URL leads to the provider's login page.
            page.goto(BASE + PLAYER)
            assert page.url.startswith(idp.issuer + "/interaction/")
            page.screenshot(path=str(ARTIFACTS / "oidc-1-idp-login.png"))
            page.fill("input[name=login]", "alice")
            page.fill("input[name=password]", "any password")
            page.click("button[type=submit]")
            # Back on the page first asked for: signed in, but no grant yet.
            page.wait_for_url(BASE + PLAYER)
            assert "Access needed" in page.content() and "alice" in page.content()
            page.screenshot(path=str(ARTIFACTS / "oidc-2-access-needed.png"))

            out = subprocess.run(
                [JITGATE, "grants", "add", "--config", str(jitgate), "--user", "alice",
                 "--scope", "recording:1/demo-1", "--ttl", "5m", "--reason", "browser test"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            page.reload()
            # The player's script fetches the events (the grant covers them) and plays them.
            playing(page)
            page.screenshot(path=str(ARTIFACTS / "oidc-3-recording.png"))

            # Sign-out: jitgate asks, the POST goes on to the provider's end-session page.
            page.goto(f"{BASE}/_jit/logout")
            assert "alice" in page.inner_text("main")
            page.screenshot(path=str(ARTIFACTS / "oidc-4-sign-out.png"))
            page.click("#logout")
            page.wait_for_url(f"{idp.issuer}/session/end**")
            page.screenshot(path=str(ARTIFACTS / "oidc-5-idp-sign-out.png"))
            page.click("button[name=logout][value=yes]")
            page.wait_for_url(AFTER_LOGOUT)
            assert page.is_visible("#sso")
            page.screenshot(path=str(ARTIFACTS / "oidc-6-signed-out.png"))
            names = [c["name"] for c in page.context.cookies(BASE)]
            assert "jitgate_session" not in names

            # Signed out at both ends: the recording asks for a login at the provider again.
            page.goto(BASE + PLAYER)
            assert page.url.startswith(idp.issuer + "/interaction/")
            assert page.is_visible("input[name=login]")
        finally:
            browser.close()
