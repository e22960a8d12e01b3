"""Every jitgate page checked with axe-core in a real browser, at laptop and at phone width.

axe-core (pinned in tests/a11y/package.json, installed by `npm ci` on first use) is injected
into each page in headless Chromium (as in test_browser_pages.py: jitgate in front of the
demo replay app) and runs the WCAG 2.1 A and AA rules and axe's best practices. Each page
must have no violations at 1280x800 and at 375x740, and must not scroll sideways at phone
width. One jitgate process serves all the pages: the grants and requests they show are
made once, up front. Screenshots go to tests/artifacts/a11y-<page>-<width>.png.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

from browserkit import ARTIFACTS, launch, need_browser, playing
from conftest import make_token
from npmkit import npm_ci
from test_browser_pages import (  # noqa: F401  (jitgate: a fixture)
    BASE,
    PLAYER,
    _api,
    _sign_in,
    jitgate,
)
from waiting import eventually_sync

AXE_DIR = Path(__file__).resolve().parent / "a11y"
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
WIDTHS = {"laptop": (1280, 800), "phone": (375, 740)}
# The pages' CSP (default-src 'none'; script-src 'self' at most) blocks the inline script
# that page.add_script_tag(path=...) adds, so the browser contexts that run axe bypass CSP.
# The pages have no inline script or style, so they render the same as under their CSP;
# the other browser tests (test_browser_pages.py, test_browser_request.py) keep it on.
AXE_CONTEXT: dict[str, Any] = {"bypass_csp": True}

# Runs in the page: axe's violations, reduced to what a failure message needs.
RUN_AXE = """async tags => {
  const result = await axe.run(document, {
    runOnly: {type: "tag", values: tags}, resultTypes: ["violations"],
  });
  return result.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help, url: v.helpUrl,
    nodes: v.nodes.map(n => ({
      target: n.target.map(t => Array.isArray(t) ? t.join(" >>> ") : t).join(" "),
      summary: n.failureSummary,
    })),
  }));
}"""


def _report(where: str, violations: list[dict[str, Any]]) -> str:
    lines = [f"{where}: {len(violations)} axe violation(s)"]
    for v in violations:
        lines.append(f"  [{v['impact']}] {v['id']}: {v['help']} ({v['url']})")
        for node in v["nodes"]:
            summary = " ".join((node["summary"] or "").split())
            lines.append(f"      {node['target']}  -- {summary[:300]}")
    return "\n".join(lines)


def _check(page: Any, axe_js: Path, path: str, name: str, status: int = 200) -> list[str]:
    """Open path at each width, run axe, take a screenshot; return what is wrong."""
    problems = []
    for width_name, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        response = page.goto(f"{BASE}{path}")
        assert response is not None and response.status == status, (path, response)
        page.add_script_tag(path=str(axe_js))
        where = f"{name} ({path}) at {width}x{height}"
        violations = page.evaluate(RUN_AXE, TAGS)
        if violations:
            problems.append(_report(where, violations))
        if width_name == "phone":
            scroll = page.evaluate("document.documentElement.scrollWidth")
            if scroll > width:
                problems.append(f"{where}: scrolls sideways (scrollWidth {scroll}px)")
        page.screenshot(path=str(ARTIFACTS / f"a11y-{name}-{width_name}.png"), full_page=True)
    return problems


def _wait_for_audit(grant_id: str, admin_token: str) -> None:
    """The audit stream is written asynchronously: wait until the grant's summary exists."""

    def recorded() -> bool:
        try:
            summary = _api("GET", f"/audit/grants/{grant_id}/summary", admin_token)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            return False
        return bool(summary["requests"]["allowed"])

    eventually_sync(recorded, interval=0.1, what=f"audit records for {grant_id}")


def test_every_page_passes_axe_at_laptop_and_phone_width(jitgate: Path) -> None:  # noqa: F811
    sync_playwright = need_browser()
    axe_js = npm_ci(AXE_DIR) / "axe-core" / "axe.min.js"
    erin_token = make_token("erin", groups=["eng"])
    sam_token = make_token("sam", groups=["security"])
    # erin: one active grant (auto-approved), one ended (history), one pending request.
    active = _api(
        "POST", "/requests", erin_token, {"scope": "recording:1/demo-1", "reason": "bug 42"}
    )
    ended = _api(
        "POST", "/requests", erin_token, {"scope": "recording:1/demo-2", "reason": "bug 41"}
    )
    _api("POST", f"/grants/{ended['id']}/relinquish", erin_token, {"comment": "done"})
    pending = _api(
        "POST", "/requests", erin_token,
        {"scope": "project:1", "reason": "customer bug 42", "ticket": "INC-42"},
    )  # fmt: skip
    assert (active["state"], pending["state"]) == ("active", "pending")

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            problems: list[str] = []
            signed_out = browser.new_context(**AXE_CONTEXT).new_page()
            problems += _check(signed_out, axe_js, "/_jit/login", "login")

            erin = _sign_in(browser, "erin", ["eng"], **AXE_CONTEXT)
            erin.goto(f"{BASE}{PLAYER}")  # a view under the active grant, for the audit
            playing(erin)
            problems += _check(erin, axe_js, "/_jit/access", "access")
            problems += _check(erin, axe_js, "/_jit/request?scope=project:1&next=/", "request")
            problems += _check(erin, axe_js, f"/_jit/pending/{pending['id']}", "pending")
            # erin holds no grant for demo-3: the gate refuses its player page with its own
            # page, which has both request forms (the recording, and project:1).
            refused = "/replay/demo-3"
            problems += _check(erin, axe_js, refused, "refused", status=403)
            assert erin.locator("#request-form-2").count() == 1

            bob = _sign_in(browser, "bob", ["approvers"], **AXE_CONTEXT)
            problems += _check(bob, axe_js, "/_jit/approvals", "approvals")

            _wait_for_audit(active["id"], sam_token)
            sam = _sign_in(browser, "sam", ["security"], **AXE_CONTEXT)
            problems += _check(sam, axe_js, "/_jit/admin", "admin")
            problems += _check(sam, axe_js, "/_jit/audit?user=erin", "audit")
            problems += _check(sam, axe_js, f"/_jit/audit/grants/{active['id']}", "audit-grant")
        finally:
            browser.close()
    assert not problems, "\n\n".join(problems)
