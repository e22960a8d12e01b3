"""authorize.Authorizer as a decision table: identity, policy and grants together.

The grant store here is an in-process checker (no wire is crossed); the Redis store's own
check is tested in test_grants.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.authorize import Authorizer, Decision
from proxy.identity import Caller, Identity
from proxy.identity.verifier import Found
from proxy.policy import Access
from proxy.policyfile import compile_text

POLICY = compile_text(
    """\
version: 1
default: identity
hierarchy:
  - scope: "recording:{project}/{recording}"
    covered_by: ["project:{project}"]
routes:
  - id: health
    path: /healthz
    access: public
  - id: share
    path: /api/projects/{project}/session_recordings/{recording}/sharing
    access: blocked
  - id: recording
    path: /api/projects/{project}/session_recordings/{recording}
    subpaths: true
    access: protected
    scope: "recording:{project}/{recording}"
""",
    "authorize-test.yaml",
)
REC = "/api/projects/1/session_recordings/r1/snapshots"
SHARE = "/api/projects/1/session_recordings/r1/sharing"
ALICE = Identity("alice", ("eng",))
EXPIRY = 1_900_000_000.0


class Grants:
    """Grants held per (user, scope); `fail` makes every check raise, as a dead store would."""

    def __init__(self, held: dict[tuple[str, str], str] | None = None, fail: bool = False):
        self.held = held or {}
        self.fail = fail
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        self.asked.append((user, scopes))
        if self.fail:
            raise ConnectionError("grant store down")
        for scope in scopes:
            if (user, scope) in self.held:
                return self.held[(user, scope)], EXPIRY
        return None


def authorizer(grants: Grants, errors: list[BaseException] | None = None) -> Authorizer:
    sink = errors if errors is not None else []
    return Authorizer(POLICY, grants, sink.append)


def caller(ident: Identity | None, source: str = "bearer", reason: str = "no credentials"):  # type: ignore[no-untyped-def]
    """An identify() stand-in that counts its calls."""
    calls: list[int] = []

    async def identify() -> Caller:
        calls.append(1)
        return Caller(Found(ident, source) if ident else None, "" if ident else reason)

    identify.calls = calls  # type: ignore[attr-defined]
    return identify


def fields(d: Decision) -> dict[str, Any]:
    return {
        "allow": d.allow,
        "status": d.status,
        "outcome": d.outcome,
        "reasons": d.reasons,
        "route": d.route,
        "scope": d.scope,
        "grant_id": d.grant_id,
        "grant_expires_at": d.grant_expires_at,
        "wider": d.wider,
        "identity": d.identity,
    }


NONE: dict[str, Any] = {"scope": None, "grant_id": None, "grant_expires_at": None, "wider": ()}
CASES: list[tuple[str, Identity | None, Grants, str, dict[str, Any]]] = [
    (
        "public needs nothing",
        None,
        Grants(),
        "/healthz",
        {"allow": True, "status": 0, "outcome": "allow", "reasons": ("public route",),
         "route": "health", "identity": None, **NONE},
    ),
    (
        "blocked even with a grant",
        ALICE,
        Grants({("alice", "recording:1/r1"): "g-1"}),
        SHARE,
        {"allow": False, "status": 403, "outcome": "blocked",
         "reasons": ("route 'share' is blocked by policy",), "route": "share",
         "identity": None, **NONE},
    ),
    (
        "identity route, nobody",
        None,
        Grants(),
        "/dashboard",
        {"allow": False, "status": 401, "outcome": "unauthenticated",
         "reasons": ("no credentials",), "route": "_default", "identity": None, **NONE},
    ),
    (
        "identity route, alice",
        ALICE,
        Grants(),
        "/dashboard",
        {"allow": True, "status": 0, "outcome": "allow",
         "reasons": ("identity-only route; user alice",), "route": "_default",
         "identity": ALICE, **NONE},
    ),
    (
        "protected, nobody",
        None,
        Grants({("alice", "recording:1/r1"): "g-1"}),
        REC,
        {"allow": False, "status": 401, "outcome": "unauthenticated",
         "reasons": ("no credentials",), "route": "recording", "identity": None, **NONE},
    ),
    (
        "protected, no grant",
        ALICE,
        Grants(),
        REC,
        {"allow": False, "status": 403, "outcome": "deny",
         "reasons": ("no active grant for recording:1/r1 (or project:1)",),
         "route": "recording", "scope": "recording:1/r1", "grant_id": None,
         "grant_expires_at": None, "wider": ("project:1",), "identity": ALICE},
    ),
    (
        "protected, grant on the recording",
        ALICE,
        Grants({("alice", "recording:1/r1"): "g-1"}),
        REC,
        {"allow": True, "status": 0, "outcome": "allow",
         "reasons": ("active grant g-1 covers recording:1/r1",), "route": "recording",
         "scope": "recording:1/r1", "grant_id": "g-1", "grant_expires_at": EXPIRY,
         "wider": ("project:1",), "identity": ALICE},
    ),
    (
        "protected, grant on the project covering it",
        ALICE,
        Grants({("alice", "project:1"): "g-2"}),
        REC,
        {"allow": True, "status": 0, "outcome": "allow",
         "reasons": ("active grant g-2 covers recording:1/r1",), "route": "recording",
         "scope": "recording:1/r1", "grant_id": "g-2", "grant_expires_at": EXPIRY,
         "wider": ("project:1",), "identity": ALICE},
    ),
    (
        "protected, another user's grant",
        ALICE,
        Grants({("bob", "recording:1/r1"): "g-3", ("bob", "project:1"): "g-4"}),
        REC,
        {"allow": False, "status": 403, "outcome": "deny",
         "reasons": ("no active grant for recording:1/r1 (or project:1)",),
         "route": "recording", "scope": "recording:1/r1", "grant_id": None,
         "grant_expires_at": None, "wider": ("project:1",), "identity": ALICE},
    ),
    (
        "protected, another project's grant",
        ALICE,
        Grants({("alice", "project:2"): "g-5"}),
        REC,
        {"allow": False, "status": 403, "outcome": "deny",
         "reasons": ("no active grant for recording:1/r1 (or project:1)",),
         "route": "recording", "scope": "recording:1/r1", "grant_id": None,
         "grant_expires_at": None, "wider": ("project:1",), "identity": ALICE},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("ident", "grants", "path", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_decide_for(
    ident: Identity | None, grants: Grants, path: str, expected: dict[str, Any]
) -> None:
    decision = await authorizer(grants).decide_for(ident, "GET", path)
    assert fields(decision) == expected
    assert decision.policy_version == POLICY.version
    assert decision.access is Access(
        {"health": "public", "share": "blocked", "recording": "protected"}.get(
            expected["route"], "identity"
        )
    )


@pytest.mark.parametrize(("ident", "grants", "path", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_decide_asks_who_only_where_it_matters(
    ident: Identity | None, grants: Grants, path: str, expected: dict[str, Any]
) -> None:
    who = caller(ident, source="session")
    decision = await authorizer(grants).decide("GET", path, who)
    assert fields(decision) == expected
    needs_identity = expected["route"] not in ("health", "share")
    assert len(who.calls) == (1 if needs_identity else 0)
    assert decision.source == ("session" if needs_identity and ident else None)
    assert decision.policy_version == POLICY.version


async def test_the_callers_reason_is_the_refusals() -> None:
    who: Callable[[], Awaitable[Caller]] = caller(None, reason="token expired")
    decision = await authorizer(Grants()).decide("GET", REC, who)
    assert (decision.status, decision.reasons) == (401, ("token expired",))


async def test_the_decision_names_the_recording() -> None:
    grants = Grants({("alice", "recording:1/r1"): "g-1"})
    allowed = await authorizer(grants).decide_for(ALICE, "GET", REC)
    refused = await authorizer(Grants()).decide_for(ALICE, "GET", REC)
    assert allowed.recording == refused.recording == "r1"
    listed = await authorizer(grants).decide_for(ALICE, "GET", "/dashboard")
    assert listed.recording is None


async def test_a_failing_grant_store_fails_closed() -> None:
    errors: list[BaseException] = []
    grants = Grants({("alice", "recording:1/r1"): "g-1"}, fail=True)
    decision = await authorizer(grants, errors).decide_for(ALICE, "GET", REC)
    assert fields(decision) == {
        "allow": False, "status": 503, "outcome": "unavailable",
        "reasons": ("grant store unavailable (ConnectionError); failing closed",),
        "route": "recording", "scope": "recording:1/r1", "grant_id": None,
        "grant_expires_at": None, "wider": ("project:1",), "identity": ALICE,
    }  # fmt: skip
    assert [type(e) for e in errors] == [ConnectionError]


async def test_the_check_asks_for_every_covering_scope_narrowest_first() -> None:
    grants = Grants()
    await authorizer(grants).decide_for(ALICE, "GET", REC)
    assert grants.asked == [("alice", ("recording:1/r1", "project:1"))]
    await authorizer(grants).decide_for(ALICE, "GET", "/healthz")
    assert len(grants.asked) == 1  # a public route never reads grants
