"""Decide one request from identity, policy and grants; every decision carries its reasons."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .grants import GrantStore
from .identity import Identity, IdentityError, Verifier
from .policy import Access, Policy


@dataclass(frozen=True)
class Decision:
    allow: bool
    status: int  # what the client gets when refused; 0 when allowed (the upstream decides)
    outcome: str  # metric label: allow, deny, blocked, unauthenticated, unavailable
    reasons: tuple[str, ...]
    route: str
    access: Access
    scope: str | None = None
    grant_id: str | None = None
    identity: Identity | None = None


@dataclass(frozen=True)
class Authorizer:
    """Immutable: a policy or key reload builds a new Authorizer and swaps it in whole."""

    policy: Policy
    verifier: Verifier
    grants: GrantStore
    on_grant_error: Callable[[BaseException], None] = lambda exc: None

    async def decide(
        self, method: str, path: str, headers: Mapping[str, str], cookies: Mapping[str, str]
    ) -> Decision:
        match = self.policy.match(method, path)
        route, access = match.route, match.access
        if access is Access.PUBLIC:
            return Decision(True, 0, "allow", ("public route",), route, access)
        if access is Access.BLOCKED:
            reason = f"route {route!r} is blocked by policy"
            return Decision(False, 403, "blocked", (reason,), route, access)

        token = self.verifier.token_from(headers, cookies)
        if token is None:
            return Decision(False, 401, "unauthenticated", ("no credentials",), route, access)
        try:
            ident = self.verifier.verify(token)
        except IdentityError as exc:
            return Decision(False, 401, "unauthenticated", (str(exc),), route, access)
        if access is Access.IDENTITY:
            reasons = (f"identity-only route; user {ident.subject}",)
            return Decision(True, 0, "allow", reasons, route, access, identity=ident)

        assert match.scope is not None
        try:
            grant_id = await self.grants.check(ident.subject, match.scopes)
        except Exception as exc:  # fail closed on any grant-store trouble
            self.on_grant_error(exc)
            reason = f"grant store unavailable ({type(exc).__name__}); failing closed"
            return Decision(
                False, 503, "unavailable", (reason,), route, access, match.scope, identity=ident
            )
        if grant_id is None:
            reason = f"no active grant for {match.scope}"
            if len(match.scopes) > 1:
                reason += f" (or {', '.join(match.scopes[1:])})"
            return Decision(
                False, 403, "deny", (reason,), route, access, match.scope, identity=ident
            )
        reason = f"active grant {grant_id} covers {match.scope}"
        return Decision(True, 0, "allow", (reason,), route, access, match.scope, grant_id, ident)
