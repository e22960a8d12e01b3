"""The differential path fuzzer, short and seeded: `make harden` runs it with ≥ 10,000 targets.

Targets from tests/pathfuzz.py go through jitgate's normaliser and policy and, as
forwarded, through Django's and Starlette's routers in-process and a real aiohttp server
and nginx over HTTP; no handler of a protected route is reached by a target that jitgate
does not protect with the same scope.
"""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from conftest import Upstream
from nginxkit import binary
from pathfuzz import Reading, fuzz, jitgate_reads, sample, violation
from test_path_tricks import raw_request

from proxy.state import STATE

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


async def test_the_fuzzer_reads_targets_as_the_running_gate_does(
    proxy: TestClient, upstream: Upstream
) -> None:
    """The in-process reading is the gate's: sent as raw bytes to a running jitgate, a
    refused target is a 400 and a forwarded one reaches the upstream as `forwarded`."""
    await proxy.app[STATE].grants.add("alice", "project:1", 60, "test", "pytest")
    forwarded = 0
    for target in sample(150):
        if any(c in target for c in " \t\x7f") or not target.isascii():
            continue  # not sendable as one request line; the parser refuses those anyway
        reading = jitgate_reads(target)
        upstream.hits.clear()
        status, _ = await raw_request(proxy, target)
        if reading.outcome == "refused":
            assert (status, upstream.paths()) == (400, []), target
        elif reading.outcome in ("prefix", "blocked"):
            assert upstream.paths() == [], target
        elif upstream.paths():
            assert upstream.paths() == [reading.forwarded], target
            forwarded += 1
        else:  # a protected route whose scope the grant does not cover
            assert (reading.outcome, status) == ("protected", 403), target
    assert forwarded > 10
