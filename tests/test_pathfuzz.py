"""The differential path fuzzer, short and seeded: `make harden` runs it with ≥ 10,000 targets.

Targets from tests/pathfuzz.py go through jitgate's normaliser and policy and, as
forwarded, through Django's and Starlette's routers in-process and a real aiohttp server
and nginx over HTTP; no handler of a protected route is reached by a target that jitgate
does not protect with the same scope.
"""

from __future__ import annotations

import pytest
from nginxkit import binary
from pathfuzz import Reading, fuzz, jitgate_reads, violation

pytestmark = pytest.mark.timeout(300)


def test_routers_agree_with_jitgate() -> None:
    binary()  # skipped without nginx, except under CI
    report = fuzz(300)
    assert report.targets == 300
    assert report.violations == []
    # Not a vacuous run: protected handlers were reached, and through every router.
    assert report.protected_served > 0 and report.routed == 4 * len(report.forwarded)


@pytest.mark.parametrize(
    ("reading", "served", "broken"),
    [
        (Reading("identity", "/x"), "recording:1/demo-1", True),
        (Reading("protected", "/x", "recording:1/demo-2"), "recording:1/demo-1", True),
        (Reading("protected", "/x", "recording:1/demo-1"), "recording:1/demo-1", False),
        (Reading("protected", "/x", "project:1"), "recording:1/demo-1", False),  # wider
        (Reading("protected", "/x", "recording:1/d%C3%A9"), "recording:1/dé", False),
        (Reading("protected", "/x", "recording:1/demo-1"), "project:1", True),
        (Reading("protected", "/x", "recording:1/demo-1"), "blocked", True),
        (Reading("blocked", "/x"), "blocked", False),
        (Reading("public", "/x"), "open", False),
    ],
)
def test_the_invariant_can_fail(reading: Reading, served: str, broken: bool) -> None:
    assert (violation(reading, served) is not None) is broken


@pytest.mark.parametrize(
    "target",
    [
        "/api/projects/1/session_recordings/%C0%AEdemo-1",  # overlong: found by the fuzzer
        "/replay/%DAdemo-1",
        "/api/projects/1%FE/session_recordings/demo-1",
    ],
)
def test_found_counterexamples_are_refused(target: str) -> None:
    assert jitgate_reads(target).outcome == "refused"
