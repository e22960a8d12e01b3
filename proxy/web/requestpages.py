"""Requesting access from the browser: the request form and the page that waits for approval.

A refused replay page offers the form itself (the gate asks `offer` for it, one form per
scope a rule lets the visitor request) and links to `{prefix}/request?scope=…&next=…`,
which explains the scope's rules and has the same form. The form posts to
`{prefix}/request`; after the origin and CSRF checks it
is one Workflow.request call, as the JSON API makes. A grant that is active at once sends
the browser straight back to `next`; one that needs approval goes to
`{prefix}/pending/{grant_id}?next=…`, which static/pending.js polls until it is decided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from yarl import URL

from ..grants import Grant
from ..identity import Identity
from ..policy import Policy, format_duration
from ..state import app_state
from ..workflow import WorkflowError
from . import csrf
from .accesspages import _field, _signed_in, checked_form, nav
from .rendering import CSP, SCRIPT_CSP
from .views import page, safe_next

# The pending page's script reads its request from the JSON API, and nothing else.
PENDING_CSP = f"{SCRIPT_CSP}; connect-src 'self'"
_ENDED = ("denied", "lapsed", "expired", "revoked", "relinquished")


def _target(request: web.Request, value: str | None) -> str:
    """Where to go once access is granted: a checked same-origin path, else My access."""
    prefix = app_state(request).settings.prefix
    return safe_next(value, prefix) if value else f"{prefix}/access"


def _rules(policy: Policy, scope: str | None, ident: Identity | None) -> list[dict[str, Any]]:
    return [
        {
            "ent": ent,
            "yours": ident is not None and ent.admits(ident.subject, ident.groups),
            "durations": ", ".join(format_duration(d) for d in ent.durations),
        }
        for ent in (policy.entitlements_for_scope(scope) if scope else ())
    ]


def _form(policy: Policy, ident: Identity, scope: str) -> dict[str, Any] | None:
    """The form for a scope under the rule a request from `ident` would be filed under."""
    ent = policy.entitlement_for(scope, ident.subject, ident.groups, break_glass=False)
    if ent is None:
        return None
    return {
        "scope": scope,
        "ent": ent,
        "durations": [(f"{d:g}", format_duration(d)) for d in ent.durations],
        "default": f"{ent.default_duration:g}",
        "pattern": ent.ticket_pattern.pattern if ent.ticket_pattern else None,
    }


async def _request_page(
    request: web.Request,
    who: csrf.Visitor | None,
    scope: str | None,
    target: str,
    *,
    status: int = 200,
    error: str | None = None,
    values: Mapping[str, str] | None = None,
) -> web.Response:
    ident = who.identity if who is not None else None
    policy = app_state(request).workflow.policy()
    form = _form(policy, ident, scope) if ident is not None and scope else None
    if form is not None and ident is not None:
        await _mark_waiting(request, ident, [form], target)
    prefix = app_state(request).settings.prefix
    here = URL(f"{prefix}/request").with_query({"scope": scope or "", "next": target})
    chrome = nav(request, ident, "") if ident is not None else {"user": None, "nav": []}
    return page(
        request,
        "request.html",
        status,
        csp=CSP,
        **chrome,
        scope=scope,
        rules=_rules(policy, scope, ident),
        form=form,
        csrf=await csrf.token(request, who) if who is not None and form is not None else "",
        next=target,
        error=error,
        values=dict(values or {}),
        login_url=str(URL(f"{prefix}/login").with_query(next=str(here))),
    )


async def offer(
    request: web.Request, scopes: Sequence[str], target: str
) -> tuple[list[dict[str, Any]], str]:
    """The request forms a refusal can offer its signed-in visitor, and their CSRF token.

    One form for each scope (the refused one, then the wider ones that cover it) under
    which a rule admits the visitor; none for a visitor who is not signed in. A scope the
    visitor already asked for carries that request (`waiting`, with the page that follows
    it) instead of a second form.
    """
    who = await csrf.visitor(request)
    if who is None:
        return [], ""
    ident, policy = who.identity, app_state(request).workflow.policy()
    forms = [form for scope in dict.fromkeys(scopes) if (form := _form(policy, ident, scope))]
    if not forms:
        return [], ""
    await _mark_waiting(request, ident, forms, target)
    return forms, await csrf.token(request, who)


async def _mark_waiting(
    request: web.Request, ident: Identity, forms: list[dict[str, Any]], target: str
) -> None:
    """Attach to each form the visitor's request for its scope still awaiting approval."""
    try:
        waiting = await app_state(request).workflow.waiting(ident)
    except RedisError:
        waiting = {}  # the forms stay; a second request would be refused when filed
    prefix = app_state(request).settings.prefix
    for form in forms:
        grant = waiting.get(form["scope"])
        form["waiting"] = grant
        if grant is not None:
            form["follow"] = str(URL(f"{prefix}/pending/{grant.id}").with_query(next=target))


async def request_access(request: web.Request) -> web.Response:
    """The rules for a scope and, for a signed-in visitor a rule admits, the request form."""
    who = await csrf.visitor(request)
    scope = request.query.get("scope", "").strip()[:500] or None
    return await _request_page(request, who, scope, _target(request, request.query.get("next")))


async def submit_request(request: web.Request) -> web.StreamResponse:
    """File the form's request through the Workflow; go back to `next` or wait for approval."""
    who = await _signed_in(request)
    settings = app_state(request).settings
    form = await checked_form(request, who, "requested")
    if isinstance(form, web.Response):
        return form
    values = {k: _field(form, k) for k in ("reason", "ticket", "duration")}
    scope = _field(form, "scope").strip()[:500]
    target = _target(request, _field(form, "next"))
    try:
        duration = float(values["duration"]) if values["duration"] else None
    except ValueError:
        duration = -1.0  # not offered: the Workflow says which are
    flow = app_state(request).workflow
    try:
        grant = await flow.request(
            who.identity,
            scope,
            reason=values["reason"],
            duration=duration,
            ticket=values["ticket"] or None,
        )
    except WorkflowError as exc:
        message = exc.message[:1].upper() + exc.message[1:] + "."
        return await _request_page(
            request, who, scope or None, target, status=exc.status, error=message, values=values
        )
    except RedisError as exc:
        message = f"The grant store is unavailable ({type(exc).__name__}); try again."
        return await _request_page(
            request, who, scope or None, target, status=503, error=message, values=values
        )
    if grant.state == "active":
        raise web.HTTPSeeOther(target, headers={"Cache-Control": "no-store"})
    waiting = URL(f"{settings.prefix}/pending/{grant.id}").with_query(next=target)
    raise web.HTTPSeeOther(str(waiting), headers={"Cache-Control": "no-store"})


async def pending(request: web.Request) -> web.Response:
    """One request's state for its requester; static/pending.js follows it to `next`."""
    who = await _signed_in(request)
    target = _target(request, request.query.get("next"))
    flow = app_state(request).workflow
    try:
        grant: Grant = await flow.show(who.identity, request.match_info["grant_id"])
    except WorkflowError as exc:
        chrome = nav(request, who.identity, "")
        return page(request, "forbidden.html", exc.status, csp=SCRIPT_CSP, message=exc.message,
                    **chrome)  # fmt: skip
    except RedisError as exc:
        text = f"The grant store is unavailable ({type(exc).__name__}); try again shortly."
        return page(request, "forbidden.html", 503, csp=SCRIPT_CSP, message=text,
                    **nav(request, who.identity, ""))  # fmt: skip
    prefix = app_state(request).settings.prefix
    again = URL(f"{prefix}/request").with_query(scope=grant.scope, next=target)
    return page(
        request,
        "pending.html",
        csp=PENDING_CSP,
        **nav(request, who.identity, ""),
        grant=grant,
        ended=grant.state in _ENDED,
        next=target,
        again=str(again),
        here=str(URL(request.path).with_query(next=target)),
        fmt=format_duration,
    )


def add_routes(app: web.Application) -> None:
    """Register the request form and the pending page on jitgate's own sub-application."""
    app.router.add_get("/request", request_access)
    app.router.add_post("/request", submit_request)
    app.router.add_get("/pending/{grant_id}", pending)
