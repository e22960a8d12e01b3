"""Grants: requested, approved, held for a limited time, ended; the model and its store.

A record goes pending -> active | denied | lapsed, and active -> expired | revoked |
relinquished. Expired and lapsed are derived on read from a passed deadline, so no writer
is needed for them. Access is decided only by the `active:` sets, which Redis expires by
itself at the grant's end; the record outlives the grant by `history_ttl` for history.

An extension request (kind "extension") is a pending record of its own that lengthens an
active grant (`extends`) by `duration` seconds once approved: pending -> applied | denied |
lapsed. The approval that completes it moves the grant's expiry in the same script, never
past `max_total` seconds from the grant's activation; if the grant is no longer active by
then (or already lasts its maximum), that approval ends the request lapsed instead and the
grant is left as it was. A grant has at most one extension request pending.

The grant store is a Protocol; its one implementation keeps grants in Redis
(grantstore.py).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

STATES = (
    "pending", "active", "denied", "lapsed", "expired", "revoked", "relinquished", "applied",
)  # fmt: skip
HISTORY_TTL = 7 * 86400.0


class GrantError(Exception):
    """A refused transition; `code` is one of the codes below, the message is for people.

    not_found, not_pending, not_active, self_approval, duplicate_approval, not_holder,
    exceeds_max, exists, not_break_glass, self_review, already_reviewed, extension_pending.

    `grant` is None when nothing was written. It is the record as it now is when the refusal
    ended it: an extension request approved after its grant ended (or reached its maximum)
    is lapsed by that approval.
    """

    def __init__(self, code: str, message: str, grant: Grant | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.grant = grant


@dataclass(frozen=True)
class Approval:
    by: str
    at: float
    comment: str = ""


@dataclass(frozen=True)
class Grant:
    id: str
    user: str
    scope: str
    created_at: float
    expires_at: float  # 0.0 until active
    reason: str
    granted_by: str  # the admin of an added grant; the approvers of a requested one
    state: str = "active"
    ticket: str = ""
    entitlement: str = ""
    duration: float = 0.0  # seconds requested
    needed: int = 0  # approvals needed
    approvals: tuple[Approval, ...] = ()
    pending_until: float = 0.0
    activated_at: float = 0.0
    ended_at: float = 0.0
    ended_by: str = ""
    end_comment: str = ""
    break_glass: bool = False
    extensions: int = 0
    extended_by: str = ""
    reviewed_by: str = ""  # break-glass only: who did the follow-up review
    reviewed_at: float = 0.0
    review_comment: str = ""
    kind: str = "grant"  # "extension": a request to lengthen the grant `extends`
    extends: str = ""  # an extension request's grant
    max_total: float = 0.0  # an extension request's longest total for its grant, seconds
    extension_request: str = ""  # a grant's latest extension request

    def remaining(self, now: float | None = None) -> float:
        if self.state != "active":
            return 0.0
        return max(0.0, self.expires_at - (time.time() if now is None else now))

    def to_dict(self) -> dict[str, Any]:
        """Return the record for JSON; unset times are None."""
        d = asdict(self)
        d["approvals"] = [asdict(a) for a in self.approvals]
        unset = ("expires_at", "pending_until", "activated_at", "ended_at", "reviewed_at")
        for name in (*unset, "max_total"):
            d[name] = d[name] or None
        return d


class GrantChecker(Protocol):
    """The one grant-store call a decision needs (RedisGrants, or a simulation in tests)."""

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        """Return (grant id, expiry) of an active grant covering any scope, or None."""


class GrantStore(Protocol):
    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None: ...

    async def add(
        self, user: str, scope: str, ttl: float, reason: str, granted_by: str
    ) -> Grant: ...

    async def request(
        self,
        user: str,
        scope: str,
        *,
        duration: float,
        reason: str,
        ticket: str | None = None,
        entitlement: str = "",
        needed: int = 0,
        pending_ttl: float = 86400.0,
        break_glass: bool = False,
    ) -> Grant: ...

    async def approve(
        self, grant_id: str, approver: str, comment: str = ""
    ) -> tuple[Grant, bool]: ...

    async def deny(self, grant_id: str, by: str, comment: str = "") -> Grant: ...

    async def revoke(self, grant_id: str, by: str = "", comment: str = "") -> Grant | None: ...

    async def relinquish(self, grant_id: str, user: str, comment: str = "") -> Grant: ...

    async def extend(
        self, grant_id: str, by: str, extra_seconds: float, max_total: float
    ) -> Grant: ...

    async def request_extension(
        self,
        grant_id: str,
        user: str,
        extra_seconds: float,
        max_total: float,
        *,
        needed: int,
        pending_ttl: float,
        comment: str = "",
    ) -> Grant: ...

    async def get(self, grant_id: str) -> Grant | None: ...

    async def list_pending(self, user: str | None = None) -> list[Grant]: ...

    async def review(self, grant_id: str, by: str, comment: str = "") -> Grant: ...

    async def list_unreviewed(self) -> list[Grant]: ...

    async def expiring_between(self, start: float, end: float) -> list[Grant]: ...

    async def claim_notices(self, kind: str, items: Iterable[tuple[str, float]]) -> list[bool]: ...

    async def count_active(self) -> int: ...

    async def sweep(self, limit: int = 500) -> list[Grant]: ...

    # Last, as in RedisGrants.
    async def list(
        self, user: str | None = None, states: Collection[str] | None = ("active",)
    ) -> list[Grant]: ...
