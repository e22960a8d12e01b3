"""Decide one request from identity, policy and grants; every decision carries its reasons."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .identity import Identity, IdentityError, SessionLookup, Verifier
from .policy import Access, Match, Policy


class GrantChecker(Protocol):
    """The one grant-store call a decision needs (RedisGrants, or a simulation in tests)."""

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        """Return (grant id, expiry) of an active grant covering any scope, or None."""


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
    grant_expires_at: float | None = None
    wider: tuple[str, ...] = ()  # scopes covering `scope`, as the policy matched them


@dataclass(frozen=True)
class Authorizer:
    """Immutable: a policy or key reload builds a new Authorizer and swaps it in whole."""

    policy: Policy
    verifier: Verifier
    grants: GrantChecker
    on_grant_error: Callable[[BaseException], None] = lambda exc: None

    async def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        peer: str | None = None,
        session: SessionLookup | None = None,
    ) -> Decision:
        """Decide a request from what it carries; `peer` is its TCP peer's address.

        `session` gives the browser session's identity; it is read only for routes that
        need an identity.
        """
        match = self.policy.match(method, path)
        ident, why = None, "no credentials"
        if match.access is not Access.PUBLIC and match.access is not Access.BLOCKED:
            # Only here does identity matter: public and blocked routes skip the token.
            try:
                found = await self.verifier.identify(headers, cookies, peer, session)
            except IdentityError as exc:
                why = str(exc)
            else:
                if found is not None:
                    ident = found.identity
                else:
                    why = self.verifier.no_identity_reason(headers, peer)
        return await self._decide(ident, match, why)

    async def decide_for(
        self,
        ident: Identity | None,
        method: str,
        path: str,
        *,
        no_identity_reason: str = "no credentials",
    ) -> Decision:
        """Decide a request on a normalised path for an already known identity (None: anonymous)."""
        return await self._decide(ident, self.policy.match(method, path), no_identity_reason)

    async def _decide(
        self, ident: Identity | None, match: Match, no_identity_reason: str
    ) -> Decision:
        route, access = match.route, match.access
        if access is Access.PUBLIC:
            return Decision(True, 0, "allow", ("public route",), route, access)
        if access is Access.BLOCKED:
            reason = f"route {route!r} is blocked by policy"
            return Decision(False, 403, "blocked", (reason,), route, access)

        if ident is None:
            return Decision(False, 401, "unauthenticated", (no_identity_reason,), route, access)
        if access is Access.IDENTITY:
            reasons = (f"identity-only route; user {ident.subject}",)
            return Decision(True, 0, "allow", reasons, route, access, identity=ident)

        assert match.scope is not None
        wider = match.scopes[1:]
        try:
            found = await self.grants.check(ident.subject, match.scopes)
        except Exception as exc:  # fail closed on any grant-store trouble
            self.on_grant_error(exc)
            reason = f"grant store unavailable ({type(exc).__name__}); failing closed"
            return Decision(
                False,
                503,
                "unavailable",
                (reason,),
                route,
                access,
                match.scope,
                identity=ident,
                wider=wider,
            )
        if found is None:
            reason = f"no active grant for {match.scope}"
            if wider:
                reason += f" (or {', '.join(wider)})"
            return Decision(
                False,
                403,
                "deny",
                (reason,),
                route,
                access,
                match.scope,
                identity=ident,
                wider=wider,
            )
        grant_id, expires_at = found
        reason = f"active grant {grant_id} covers {match.scope}"
        return Decision(
            True, 0, "allow", (reason,), route, access, match.scope, grant_id, ident, expires_at
        )
