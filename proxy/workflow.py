"""The access workflow: request, approve, deny, revoke, relinquish, extend and review.

The policy's entitlements say who may request which scope, for how long and approved
how; the grant store makes each transition atomic; every transition is audited with its
actor and comment, and the ones people wait on are sent to webhooks when a notifier is
configured. Errors carry an HTTP status and a code for the API.

Extending a grant under an entitlement with `extend.requires_approval` files an extension
request: a pending record of its own that approvers decide like any request; the last
approval it needs lengthens the grant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import audit
from .grants import Grant, GrantError, GrantStore
from .identity import Identity
from .notify import Notifier
from .policy import Entitlement, Policy
from .sensitivity import Rule
from .settings import AdminSettings

# The sensitivity rule a recording scope matches: (rule or None, None), or (None, why its
# metadata is unknown).
Sensitive = Callable[[str], Awaitable[tuple[Rule | None, str | None]]]

_MAX_TEXT = 1000


class WorkflowError(Exception):
    """A refused workflow step: status and code for the API, message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_GRANT_ERRORS = {
    "not_found": 404,
    "not_pending": 409,
    "not_active": 409,
    "self_approval": 403,
    "duplicate_approval": 409,
    "not_holder": 403,
    "exceeds_max": 400,
    "not_break_glass": 409,
    "self_review": 403,
    "already_reviewed": 409,
    "extension_pending": 409,
}


@dataclass(frozen=True)
class Workflow:
    policy: Callable[[], Policy]
    grants: GrantStore
    audit: audit.AuditLog
    admins: AdminSettings
    notifier: Notifier | None = None  # None: no webhooks configured
    counted: Callable[[str], None] = lambda event: None  # each event written (metrics)
    # A grant was requested or activated: app.py fetches its recording's metadata meanwhile.
    granted: Callable[[Grant], None] = lambda grant: None
    sensitive: Sensitive | None = None  # None: no metadata, so no rule is known at request

    def is_admin(self, ident: Identity) -> bool:
        return ident.subject in self.admins.users or bool(self.admins.groups & set(ident.groups))

    async def request(
        self,
        ident: Identity,
        scope: str,
        *,
        reason: str,
        duration: float | None = None,
        ticket: str | None = None,
        break_glass: bool = False,
    ) -> Grant:
        """File a request; an auto-approved or break-glass one is active at once."""
        scope = scope.strip()
        if not scope:
            raise WorkflowError(400, "bad_request", "a scope is required")
        rule = await self._sensitivity(scope)
        # Break-glass requests consider only break-glass rules, ordinary ones only the rest;
        # for a sensitive recording, only the rules its sensitivity rule names.
        ent = self.policy().entitlement_for(
            scope,
            ident.subject,
            ident.groups,
            break_glass=break_glass,
            among=rule.entitlements if rule is not None else None,
        )
        if ent is None:
            kind = "break-glass access to" if break_glass else "access to"
            message = f"no entitlement lets {ident.subject} request {kind} {scope}"
            if rule is not None:
                message = f"{rule.reason}: only {' or '.join(rule.entitlements)} apply; {message}"
            raise WorkflowError(403, "not_entitled", message)
        reason = _text(reason, "reason")
        if ent.reason_required and not reason:
            raise WorkflowError(400, "bad_request", "a reason is required")
        ticket = _text(ticket, "ticket") or None
        if not ent.ticket_ok(ticket):
            pattern = ent.ticket_pattern.pattern if ent.ticket_pattern else ""
            message = f"a ticket matching {pattern} is required"
            raise WorkflowError(400, "bad_request", message)
        seconds = _duration(ent, duration)
        needed = 0 if (ent.approval.mode == "auto" or ent.break_glass) else ent.approval.count
        if needed:
            waiting = (await self.waiting(ident)).get(scope)
            if waiting is not None:
                raise WorkflowError(
                    409,
                    "already_pending",
                    f"your request {waiting.id} for {scope} is already waiting for approval",
                )
        try:
            # The store checks for a waiting request again, atomically with filing this
            # one: concurrent identical requests cannot all get past the check above.
            grant = await self.grants.request(
                ident.subject,
                scope,
                duration=seconds,
                reason=reason,
                ticket=ticket,
                entitlement=ent.id,
                needed=needed,
                pending_ttl=ent.pending_ttl,
                break_glass=ent.break_glass,
            )
        except GrantError as exc:
            raise _from(exc) from None
        self._audit("grant.requested", grant, actor=ident.subject)
        self._notify("requested", grant)
        self.granted(grant)
        if ent.break_glass:
            self._audit("break_glass", grant, actor=ident.subject)
            self._notify("break_glass", grant)
        if grant.state == "active":
            self._audit("grant.activated", grant, actor=ident.subject)
        return grant

    async def _sensitivity(self, scope: str) -> Rule | None:
        """The `require` rule a recording matches; refuse one blocked or of unknown metadata."""
        if self.sensitive is None or not self.policy().sensitivity:
            return None
        rule, unknown = await self.sensitive(scope)
        if unknown is not None:
            reason = f"sensitivity rules apply and {unknown}: failing closed"
            raise WorkflowError(503, "unavailable", reason)
        if rule is not None and rule.action == "block":
            raise WorkflowError(403, "sensitive", rule.reason)
        return rule

    async def waiting(self, ident: Identity) -> dict[str, Grant]:
        """Return this person's requests (not extensions) still awaiting approval, by scope."""
        pending = await self.grants.list_pending(ident.subject)
        return {g.scope: g for g in pending if g.kind == "grant"}

    async def approve(self, ident: Identity, grant_id: str, comment: str = "") -> Grant:
        """Add one approval; the last one needed activates the grant (its clock starts now).

        For an extension request the last approval lengthens its grant instead; if that grant
        has ended meanwhile, the request ends lapsed and the approval is refused (409).
        """
        grant = await self._get(grant_id)
        ent = self._entitlement(grant)
        if not ent.may_approve(ident.subject, ident.groups):
            raise WorkflowError(
                403, "not_approver", f"{ident.subject} may not approve requests for {ent.id!r}"
            )
        comment = _text(comment, "comment")
        try:
            grant, done = await self.grants.approve(grant_id, ident.subject, comment)
        except GrantError as exc:
            if exc.grant is None:
                raise _from(exc) from None
            # An extension request that can no longer apply ended with this approval.
            lapsed = exc.grant
            self._audit("grant.lapsed", lapsed, actor=ident.subject, comment=lapsed.end_comment)
            raise WorkflowError(409, exc.code, str(exc)) from None
        self._audit("grant.approved", grant, actor=ident.subject, comment=comment)
        if done and grant.kind == "extension":
            parent = await self.grants.get(grant.extends)
            self._audit(
                "grant.extended",
                parent if parent is not None else grant,
                actor=ident.subject,
                extension=grant.id,
                extra_seconds=grant.duration,
                comment=comment,
            )
            self._notify("approved", grant)
        elif done:
            self._audit("grant.activated", grant, actor=ident.subject)
            self._notify("approved", grant)
            self.granted(grant)
        return grant

    async def deny(self, ident: Identity, grant_id: str, comment: str = "") -> Grant:
        """Deny a pending request (an approver), or withdraw it (its requester)."""
        grant = await self._get(grant_id)
        if grant.user != ident.subject and not self.is_admin(ident):
            ent = self._entitlement(grant)
            if not ent.may_approve(ident.subject, ident.groups):
                raise WorkflowError(
                    403, "not_approver", f"{ident.subject} may not deny requests for {ent.id!r}"
                )
        return await self._end("deny", "grant.denied", ident, grant_id, comment)

    async def revoke(self, ident: Identity, grant_id: str, comment: str = "") -> Grant:
        """End an active grant at once (an admin)."""
        if not self.is_admin(ident):
            raise WorkflowError(403, "not_admin", "only an admin may revoke grants")
        await self._get(grant_id)  # 404 for an unknown id, 409 below for one not active
        return await self._end("revoke", "grant.revoked", ident, grant_id, comment)

    async def relinquish(self, ident: Identity, grant_id: str, comment: str = "") -> Grant:
        """End one's own active grant early."""
        return await self._end("relinquish", "grant.relinquished", ident, grant_id, comment)

    async def extend(
        self, ident: Identity, grant_id: str, duration: float, comment: str = ""
    ) -> Grant:
        """Lengthen one's own active grant within the entitlement's maximum.

        Where the entitlement's extensions need approval, file an extension request instead
        and return it (kind "extension", state pending); its approvers decide it like any
        request.
        """
        grant = await self._get(grant_id)
        if grant.user != ident.subject:
            raise WorkflowError(403, "not_holder", "only the grant's holder may extend it")
        ent = self._entitlement(grant)
        if duration <= 0:
            raise WorkflowError(400, "bad_request", "the extension must be positive")
        comment = _text(comment, "comment")
        if ent.extend_requires_approval:
            return await self._request_extension(ident, ent, grant_id, duration, comment)
        try:
            grant = await self.grants.extend(grant_id, ident.subject, duration, ent.max_duration)
        except GrantError as exc:
            raise _from(exc) from None
        self._audit("grant.extended", grant, actor=ident.subject, comment=comment)
        return grant

    async def _request_extension(
        self, ident: Identity, ent: Entitlement, grant_id: str, duration: float, comment: str
    ) -> Grant:
        try:
            request = await self.grants.request_extension(
                grant_id,
                ident.subject,
                duration,
                ent.max_duration,
                needed=ent.approval.count,
                pending_ttl=ent.pending_ttl,
                comment=comment,
            )
        except GrantError as exc:
            raise _from(exc) from None
        self._audit("grant.extension_requested", request, actor=ident.subject, comment=comment)
        self._notify("requested", request)
        return request

    async def review(self, ident: Identity, grant_id: str, comment: str = "") -> Grant:
        """Record the follow-up review of break-glass access (an approver of its rule, an admin)."""
        grant = await self._get(grant_id)
        if not self.is_admin(ident):
            ent = self._entitlement(grant)
            if not ent.may_approve(ident.subject, ident.groups):
                raise WorkflowError(
                    403, "not_approver", f"{ident.subject} may not review grants under {ent.id!r}"
                )
        comment = _text(comment, "comment")
        try:
            grant = await self.grants.review(grant_id, ident.subject, comment)
        except GrantError as exc:
            raise _from(exc) from None
        self._audit("grant.reviewed", grant, actor=ident.subject, comment=comment)
        return grant

    async def unreviewed(self, ident: Identity) -> list[Grant]:
        """Return break-glass grants awaiting review that this person may review (admins: all)."""
        grants = await self.grants.list_unreviewed()
        if self.is_admin(ident):
            return grants
        policy = self.policy()
        out = []
        for grant in grants:
            ent = policy.entitlement(grant.entitlement) if grant.entitlement else None
            if ent is not None and ent.may_approve(ident.subject, ident.groups):
                out.append(grant)
        return out

    async def show(self, ident: Identity, grant_id: str) -> Grant:
        """Return one grant to its holder, an eligible approver or an admin."""
        grant = await self._get(grant_id)
        if grant.user == ident.subject or self.is_admin(ident):
            return grant
        ent = self.policy().entitlement(grant.entitlement) if grant.entitlement else None
        if ent is not None and ent.may_approve(ident.subject, ident.groups):
            return grant
        raise WorkflowError(404, "not_found", f"no grant {grant_id}")  # don't reveal it exists

    async def mine(self, ident: Identity) -> list[Grant]:
        return await self.grants.list(ident.subject, states=None)

    async def pending_for(self, ident: Identity) -> list[Grant]:
        """Pending requests this person may decide, their own included (marked by the UI)."""
        policy = self.policy()
        out = []
        for grant in await self.grants.list_pending():
            ent = policy.entitlement(grant.entitlement) if grant.entitlement else None
            if ent is not None and ent.may_approve(ident.subject, ident.groups):
                out.append(grant)
        return out

    async def all(
        self, ident: Identity, *, user: str | None = None, states: tuple[str, ...] | None = None
    ) -> list[Grant]:
        if not self.is_admin(ident):
            raise WorkflowError(403, "not_admin", "only an admin may list every grant")
        return await self.grants.list(user, states=states)

    async def _end(
        self, verb: str, event: str, ident: Identity, grant_id: str, comment: str
    ) -> Grant:
        comment = _text(comment, "comment")
        try:
            if verb == "deny":
                grant = await self.grants.deny(grant_id, ident.subject, comment)
            elif verb == "revoke":
                found = await self.grants.revoke(grant_id, by=ident.subject, comment=comment)
                if found is None:
                    raise WorkflowError(409, "not_active", f"grant {grant_id} is not active")
                grant = found
            else:
                grant = await self.grants.relinquish(grant_id, ident.subject, comment)
        except GrantError as exc:
            raise _from(exc) from None
        self._audit(event, grant, actor=ident.subject, comment=comment)
        if verb == "deny":
            self._notify("denied", grant)
        return grant

    async def sweep(self) -> int:
        """Audit grants that expired and requests that lapsed; once across all replicas."""
        ended = await self.grants.sweep()
        for grant in ended:
            self._audit(f"grant.{grant.state}", grant, actor="jitgate")
        return len(ended)

    async def _get(self, grant_id: str) -> Grant:
        grant = await self.grants.get(grant_id)
        if grant is None:
            raise WorkflowError(404, "not_found", f"no grant {grant_id}")
        return grant

    def _entitlement(self, grant: Grant) -> Entitlement:
        ent = self.policy().entitlement(grant.entitlement) if grant.entitlement else None
        if ent is None:
            raise WorkflowError(
                409, "no_entitlement",
                f"grant {grant.id} was not requested under an entitlement the policy still has",
            )  # fmt: skip
        return ent

    def _notify(self, event: str, grant: Grant) -> None:
        if self.notifier is not None:
            self.notifier.notify(event, grant)

    def _audit(self, event: str, grant: Grant, **extra: object) -> None:
        self.counted(event)
        policy = self.policy()
        self.audit.emit(
            grant_record(
                event,
                grant,
                policy_version=policy.version,
                recording=policy.recording_of(grant.scope),
                **extra,
            )
        )


def grant_record(event: str, grant: Grant, **extra: object) -> audit.Record:
    """Build the audit record of one grant transition."""
    return audit.record(
        event,
        user=grant.user,
        scope=grant.scope,
        grant_id=grant.id,
        state=grant.state,
        reason=grant.reason,
        ticket=grant.ticket or None,
        entitlement=grant.entitlement or None,
        duration=grant.duration or None,
        approvers=[a.by for a in grant.approvals] or None,
        expires_at=grant.expires_at or None,
        break_glass=grant.break_glass or None,
        extends=grant.extends or None,
        **extra,
    )


def _text(value: str | None, name: str) -> str:
    text = (value or "").strip()
    if len(text) > _MAX_TEXT:
        raise WorkflowError(400, "bad_request", f"{name} is longer than {_MAX_TEXT} characters")
    return text


def _duration(ent: Entitlement, duration: float | None) -> float:
    if duration is None:
        return ent.default_duration
    if duration not in ent.durations and duration != ent.default_duration:
        offered = ", ".join(_human(d) for d in ent.durations)
        raise WorkflowError(400, "bad_request", f"duration must be one of {offered}")
    return duration


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _from(exc: GrantError) -> WorkflowError:
    return WorkflowError(_GRANT_ERRORS.get(exc.code, 409), exc.code, str(exc))
