"""`make soak`'s script, run short: grants churn and the policy reloads under load, and
every decision that can be judged is the expected one.

Twenty seconds say nothing about memory growth, so only the soak's correctness is checked
here: no errors, no wrong decisions, every reload taken up, and enough of each kind of
request and grant change for that to mean something.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.timeout(150)
def test_short_soak_decides_right_while_grants_and_policy_change() -> None:
    argv = [
        sys.executable, str(ROOT / "harden" / "soak.py"), "--minutes", "0.33", "--probe", "2",
        "--reload", "5", "--connections", "8", "--upstream", "aiohttp", "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=140, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert report["errors"] == 0, report["error_kinds"]
    assert report["wrong"] == 0, report["wrong_first"]
    assert report["log_errors"] == 0
    assert report["reloads"]["taken"] == report["reloads"]["asked"] >= 2
    judged = report["ok"] + report["refused"] - report["ambiguous"]
    assert report["ok"] > 100 and report["refused"] > 100 and judged > 0.8 * report["sent"]
    grants = report["grants"]
    assert grants["added"] >= 10 and grants["revoked"] >= 3
