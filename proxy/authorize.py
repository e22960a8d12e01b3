"""Decide one request from identity, policy and grants; every decision carries its reasons."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .bodyrules import BadBody, BodyTooLarge
from .grants import GrantChecker
from .identity import NOBODY, Caller, Identity
from .policy import Access, Blobs, Match, Policy
from .sensitivity import Rule, matching

# A recording's metadata for sensitivity rules: (metadata, None), (None, why it is unknown),
# or None when the scope names no recording the metadata describes.
MetadataLookup = Callable[[str], Awaitable[tuple[Mapping[str, Any] | None, str | None] | None]]


@dataclass(frozen=True)
class Decision:
    """What to do with one request, and why: the refusal page and the audit record alike."""

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
    source: str | None = None  # how the identity was found: bearer, session, cookie, ...
    policy_version: str = ""  # the policy that decided: a reload mid-request changes nothing
    recording: str | None = None  # the recording `scope` names, if it names one
    blobs: Blobs | None = None  # allowed: the response's presigned URLs to rewrite (blobs.py)
    reason_code: str | None = None  # unauthenticated: why, as a stable word (docs/identity.md)

    @property
    def challenge(self) -> str:
        """A 401's WWW-Authenticate: a token that was sent and refused is `invalid_token`
        (RFC 6750 section 3.1), so a client knows to get a new one."""
        if self.reason_code in _NOT_THE_TOKEN:
            return 'Bearer realm="jitgate"'
        return 'Bearer realm="jitgate", error="invalid_token"'

    @property
    def error(self) -> str:
        """A refusal's one-word kind, as its JSON and its page heading name it."""
        if self.status == 403:
            return "blocked" if self.outcome == "blocked" else "access_denied"
        return _ERRORS.get(self.status, "refused")

    def refusal(self) -> dict[str, Any]:
        """The JSON a script is refused with (the proxy and forward-auth alike); callers add
        where to go next (request_url, login_url)."""
        payload: dict[str, Any] = {"error": self.error, "reasons": list(self.reasons)}
        if self.reason_code:
            payload["reason_code"] = self.reason_code
        if self.scope:
            payload["scope"] = self.scope
        return payload


# Reason codes of a 401 that no token of the client's caused.
_NOT_THE_TOKEN = frozenset({None, "no_credentials", "header_invalid", "jwks_unavailable"})
_ERRORS = {401: "unauthenticated", 503: "unavailable"}


@dataclass(frozen=True)
class Authorizer:
    """Immutable: a policy reload builds a new Authorizer and swaps it in whole."""

    policy: Policy
    grants: GrantChecker
    on_grant_error: Callable[[BaseException], None] = lambda exc: None
    metadata: MetadataLookup | None = None  # None: no metadata section
    on_sensitivity: Callable[[str], None] = lambda outcome: None  # blocked, unknown
    # The entitlement a grant was given under (sensitivity rules that require one).
    grant_entitlement: Callable[[str], Awaitable[str | None]] | None = None

    async def decide(
        self,
        method: str,
        path: str,
        caller: Callable[[], Awaitable[Caller]],
        query: str = "",
        body: Callable[[], Awaitable[bytes]] | None = None,
    ) -> Decision:
        """Decide a request on its normalised path; `caller` identifies it when asked.

        Only routes that need an identity ask: public and blocked routes skip the token.
        `query` is the raw query string, forwarded as it is; routes with `query:` read it.
        `body` reads the request body, held whole: only routes with `body:` call it, and
        where there is none (forward-auth) they are refused.
        """
        match = self.policy.match(method, path, query)
        if match.body:
            found = await self._with_body(match, body)
            if isinstance(found, Decision):
                return found
            match = found
        if match.invalid is not None:
            return self._invalid(match)
        if match.access is Access.PUBLIC or match.access is Access.BLOCKED:
            return self._decide(None, None, match, NOBODY)
        who = await caller()
        return await self._decide_with_grants(who.identity, who.source, match, who)

    async def decide_for(
        self,
        ident: Identity | None,
        method: str,
        path: str,
        *,
        nobody: Caller = NOBODY,
        query: str = "",
        body: bytes | None = None,
    ) -> Decision:
        """Decide a request on a normalised path for an already known identity (None: anonymous)."""
        match = self.policy.match(method, path, query)
        if match.body and body is not None:
            match = self.policy.match_body(match, body)
        elif match.body:
            note = f"route {match.route!r} decides on the request body, and none was given"
            match = replace(match, note=note)
        if match.invalid is not None:
            return self._invalid(match)
        return await self._decide_with_grants(ident, None, match, nobody)

    async def _with_body(
        self, match: Match, body: Callable[[], Awaitable[bytes]] | None
    ) -> Match | Decision:
        common: dict[str, Any] = {"policy_version": self.policy.version}
        if body is None:
            reason = (
                f"route {match.route!r} decides on the request body, which forward-auth "
                "cannot see: serve it through jitgate's proxy"
            )
            return Decision(False, 403, "blocked", (reason,), match.route, match.access, **common)
        try:
            data = await body()
        except BodyTooLarge as exc:
            reason = f"route {match.route!r} decides on the request body: {exc}"
            return Decision(
                False, 413, "bad_request", (reason,), match.route, match.access, **common
            )
        except BadBody as exc:
            return self._invalid(replace(match, invalid=str(exc)))
        return self.policy.match_body(match, data)

    def _invalid(self, match: Match) -> Decision:
        """A request its route cannot read one way only (e.g. a query parameter given twice)."""
        reason = f"route {match.route!r} cannot decide this request: {match.invalid}"
        version = self.policy.version
        return Decision(
            False, 400, "bad_request", (reason,), match.route, match.access, policy_version=version
        )

    def _decide(
        self, ident: Identity | None, source: str | None, match: Match, nobody: Caller
    ) -> Decision:
        """Decide what needs no grant store; `nobody` says why `ident` is None, if it is."""
        route, access = match.route, match.access
        common: dict[str, Any] = {"source": source, "policy_version": self.policy.version}
        if access is Access.PUBLIC:
            return Decision(True, 0, "allow", ("public route",), route, access, **common)
        if access is Access.BLOCKED:
            reason = match.note or f"route {route!r} is blocked by policy"
            return Decision(False, 403, "blocked", (reason,), route, access, **common)
        if ident is None:
            return Decision(
                False, 401, "unauthenticated", (nobody.reason,), route, access,
                reason_code=nobody.code, **common,
            )  # fmt: skip
        reasons = (f"identity-only route; user {ident.subject}",)
        return Decision(True, 0, "allow", reasons, route, access, identity=ident, **common)

    async def _decide_with_grants(
        self, ident: Identity | None, source: str | None, match: Match, nobody: Caller
    ) -> Decision:
        if match.access is not Access.PROTECTED or ident is None:
            return self._decide(ident, source, match, nobody)
        route, access, scope = match.route, match.access, match.scope
        assert scope is not None
        wider = match.scopes[1:]
        refused: dict[str, Any] = {
            "scope": scope,
            "identity": ident,
            "wider": wider,
            "source": source,
            "policy_version": self.policy.version,
            "recording": self.policy.recording_of(scope),
        }
        try:
            found = await self.grants.check(ident.subject, match.scopes)
        except Exception as exc:  # fail closed on any grant-store trouble
            self.on_grant_error(exc)
            reason = f"grant store unavailable ({type(exc).__name__}); failing closed"
            return Decision(False, 503, "unavailable", (reason,), route, access, **refused)
        if found is None:
            reason = f"no active grant for {scope}"
            if wider:
                reason += f" (or {', '.join(wider)})"
            return Decision(False, 403, "deny", (reason,), route, access, **refused)
        if self.policy.sensitivity:
            held = await self._sensitive(scope, found[0], route, access, refused)
            if held is not None:
                return held
        grant_id, expires_at = found
        reason = f"active grant {grant_id} covers {scope}"
        return Decision(
            True,
            0,
            "allow",
            (reason,),
            route,
            access,
            grant_id=grant_id,
            grant_expires_at=expires_at,
            blobs=match.blobs,
            **refused,
        )

    async def _sensitive(
        self, scope: str, grant_id: str, route: str, access: Access, common: dict[str, Any]
    ) -> Decision | None:
        """Refuse a recording a sensitivity rule keeps from this grant, or whose metadata is
        unknown."""
        why: str | None = "no metadata section is configured"
        if self.metadata is not None:
            found = await self.metadata(scope)
            if found is None:  # not a recording the metadata describes
                return None
            meta, why = found
            if meta is not None:
                rule = matching(self.policy.sensitivity, meta)
                if rule is None:
                    return None
                refusal = rule.refusal(None)
                if rule.action == "require":
                    refusal, why = await self._entitled(rule, grant_id)
                    if refusal is None and why is None:
                        return None
                if refusal is not None:
                    self.on_sensitivity("blocked")
                    outcome = "blocked" if rule.action == "block" else "deny"
                    return Decision(False, 403, outcome, (refusal,), route, access, **common)
        self.on_sensitivity("unknown")
        reason = f"sensitivity rules apply and {why}: failing closed"
        return Decision(False, 503, "unavailable", (reason,), route, access, **common)

    async def _entitled(self, rule: Rule, grant_id: str) -> tuple[str | None, str | None]:
        """(refusal or None, None), or (None, why the grant's entitlement is unknown)."""
        if self.grant_entitlement is None:
            return None, f"the entitlement of grant {grant_id} cannot be read"
        try:
            entitlement = await self.grant_entitlement(grant_id)
        except Exception as exc:  # the grant store in doubt: fail closed
            self.on_grant_error(exc)
            return None, f"the entitlement of grant {grant_id} cannot be read ({exc!r})"
        return rule.refusal(entitlement), None
