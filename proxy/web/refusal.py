"""The refusal: what a browser or a script is told when the gate does not forward a request.

The gate decides; this module only answers. A browser gets "Access needed" with one
request form per scope a rule lets the visitor ask for; a script gets JSON naming the
scope and where to ask.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from yarl import URL

from ..authorize import Decision
from ..hygiene import wants_html
from ..state import app_state
from . import requestpages
from .accesspages import nav
from .rendering import CSP, render
from .views import safe_next

_HEADINGS = {
    "unauthenticated": "Sign-in required",
    "access_denied": "Access needed",
    "blocked": "Blocked by policy",
    "unavailable": "Access check unavailable",
}


def _to_provider(request: web.Request, sso_login: bool) -> bool:
    """With OIDC, a browser without a session goes to the provider, not to a 401 page."""
    return (
        sso_login
        and request.method in ("GET", "HEAD")
        and wants_html(request)
        and "Authorization" not in request.headers
    )


async def refuse(request: web.Request, decision: Decision, path: str) -> web.Response:
    """Answer a refused request: a page naming what is needed (with the forms to ask for it)
    for a browser, JSON for a script; a browser without a session goes to sign in."""
    settings = app_state(request).settings
    prefix = settings.prefix
    request_url, back = None, None
    if decision.scope and decision.status == 403 and decision.outcome == "deny":
        origin = request.url.origin()
        request_url = str(origin.with_path(f"{prefix}/request").with_query(scope=decision.scope))
        if wants_html(request) and request.method in ("GET", "HEAD"):
            # The page's forms bring the browser back here once access is granted.
            back = safe_next(request.path_qs, prefix)
            request_url = str(URL(request_url).update_query(next=back))
    login_url = None
    if decision.status == 401:
        login_url = str(URL(f"{prefix}/login").with_query(next=request.path_qs))
        if _to_provider(request, settings.identity.oidc is not None):
            # Only a page the browser navigated to: a redirect would lose a POST's body,
            # and a script's fetch cannot follow it to another origin anyway.
            sso = URL(f"{prefix}/oidc/login").with_query(next=request.path_qs)
            return web.Response(
                status=302, headers={"Location": str(sso), "Cache-Control": "no-store"}
            )
    headers = {"Cache-Control": "no-store"}
    if decision.status == 401:
        headers["WWW-Authenticate"] = decision.challenge
    if wants_html(request):
        forms: list[dict[str, Any]] = []
        token = ""
        if back is not None and decision.identity is not None and decision.scope:
            scopes = [decision.scope, *decision.wider]
            forms, token = await requestpages.offer(request, scopes, back)
        headers["Content-Security-Policy"] = CSP
        body = render(
            request,
            "refused.html",
            prefix=prefix,
            **(nav(request, decision.identity, "") if decision.identity else {"user": None}),
            status=decision.status,
            heading=_HEADINGS.get(decision.error, "Access refused"),
            kind="recording" if decision.scope and "/" in decision.scope else "resource",
            scope=decision.scope,
            wider=decision.wider,
            reasons=decision.reasons,
            request_url=request_url,
            forms=forms,
            csrf=token,
            next=back,
            login_url=login_url,
            method=request.method,
            path=path,
        )
        return web.Response(
            status=decision.status, text=body, content_type="text/html", headers=headers
        )
    payload = decision.refusal()
    if request_url:
        payload["request_url"] = request_url
    return web.Response(
        status=decision.status,
        text=json.dumps(payload),
        content_type="application/json",
        headers=headers,
    )
