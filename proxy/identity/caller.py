"""Identify a request once: the first part that asks (gate, API or page) keeps the answer
on the request, and every later one reads it from there."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .session import Sessions
from .verifier import Found, Identity, IdentityError, Verifier


@dataclass(frozen=True)
class Caller:
    """Who sent a request and how they were identified, or why nobody was."""

    found: Found | None
    reason: str = ""  # why there is no identity: a bad credential, or none at all
    code: str = ""  # the reason's stable word (docs/identity.md), for the audit record

    @property
    def identity(self) -> Identity | None:
        return self.found.identity if self.found is not None else None

    @property
    def source(self) -> str | None:
        """bearer, session, cookie, headers or assertion; None without an identity."""
        return self.found.source if self.found is not None else None


NOBODY = Caller(None, "no credentials", "no_credentials")

_KEY = web.RequestKey("caller", Caller)


async def identify(request: web.Request, verifier: Verifier, sessions: Sessions | None) -> Caller:
    """Return who `request` is from; verified the first time, then read from the request."""
    cached: Caller | None = request.get(_KEY)
    if cached is not None:
        return cached
    lookup = sessions.lookup(request) if sessions is not None else None
    try:
        found = await verifier.identify(request.headers, request.cookies, request.remote, lookup)
    except IdentityError as exc:
        caller = Caller(None, str(exc), exc.code)
    else:
        if found is None:
            reason = verifier.no_identity_reason(request.headers, request.remote)
            caller = Caller(None, reason, NOBODY.code)
        else:
            caller = Caller(found)
    request[_KEY] = caller
    return caller
