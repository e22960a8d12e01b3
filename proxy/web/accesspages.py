"""The access pages under the prefix: My access, Approvals and Admin.

Every decision is the Workflow's, the same one the JSON API calls; these handlers only
choose what to show and turn a form into one Workflow call. A form posts to
`{prefix}/{page}/{grant_id}` with the action on its button; the handler checks the
origin and the CSRF token (proxy.web.csrf) before anything else, then redirects back to
the page with the outcome as a flash message (Post/Redirect/Get), so a reload never
repeats an action.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy
from redis.exceptions import RedisError
from yarl import URL

from ..grants import Grant
from ..identity import Identity
from ..policy import Policy, format_duration
from ..settings.read import parse_duration
from ..state import app_state
from ..workflow import Workflow, WorkflowError
from . import csrf
from .origin import same_origin
from .rendering import SCRIPT_CSP
from .views import page, safe_next

# Which actions each page's forms may post: a form can only do what its page offers.
ACTIONS: Mapping[str, tuple[str, ...]] = {
    "access": ("relinquish", "extend", "withdraw"),
    "approvals": ("approve", "deny", "review"),
    "admin": ("revoke", "review"),
}

# "Expires within" choices on the admin page, in seconds ("" = any time).
WITHIN = (("", "any time"), ("900", "15 minutes"), ("3600", "1 hour"), ("14400", "4 hours"),
          ("86400", "1 day"))  # fmt: skip

_HISTORY = 50  # ended grants shown on My access; the audit trail has the rest

# What a refused step means to the person who clicked; the workflow's own text otherwise.
_FRIENDLY = {
    "self_approval": "You cannot approve your own request; another approver must decide it.",
    "duplicate_approval": "You have already approved this request.",
    "not_pending": "That request has already been decided, withdrawn or has lapsed.",
    "not_active": "That grant is no longer active.",
    "not_found": "There is no such grant or request (it may have ended and been removed).",
    "not_approver": "You are not an approver for that request.",
    "not_holder": "Only the holder of that grant may do that.",
    "not_admin": "Only an admin may do that.",
    "self_review": "You cannot review your own break-glass access; another reviewer must.",
    "already_reviewed": "That break-glass access has already been reviewed.",
    "exceeds_max": "That would make the grant last longer than its rule allows.",
    "extension_pending": "An extension of that grant is already waiting for approval.",
}


def nav(request: web.Request, ident: Identity, current: str) -> dict[str, Any]:
    """Return the page chrome's context: the signed-in user and the nav for their role."""
    prefix = app_state(request).settings.prefix
    links = [("access", "My access"), ("approvals", "Approvals")]
    if app_state(request).workflow.is_admin(ident):
        links += [("admin", "Admin"), ("audit", "Audit")]
    return {
        "user": ident.subject,
        "nav": [
            {"href": f"{prefix}/{name}", "label": label, "current": name == current}
            for name, label in links
        ],
    }


async def _signed_in(request: web.Request) -> csrf.Visitor:
    """Return the visitor, or send them to sign in and come back here."""
    who = await csrf.visitor(request)
    if who is None:
        settings = app_state(request).settings
        back = safe_next(
            request.path_qs if request.method == "GET" else request.path, settings.prefix
        )
        login = URL(f"{settings.prefix}/login").with_query(next=back)
        raise web.HTTPSeeOther(str(login), headers={"Cache-Control": "no-store"})
    return who


async def _show(
    request: web.Request, who: csrf.Visitor, template: str, current: str, **context: Any
) -> web.Response:
    flash = await csrf.read_flash(request, who)
    response = page(
        request,
        template,
        csp=SCRIPT_CSP,
        **nav(request, who.identity, current),
        csrf=await csrf.token(request, who),
        flash=flash,
        now=time.time(),
        **context,
    )
    csrf.clear_flash(request, response)
    return response


def _forbidden(request: web.Request, who: csrf.Visitor | None, message: str) -> web.Response:
    chrome = nav(request, who.identity, "") if who is not None else {"user": None, "nav": []}
    return page(request, "forbidden.html", 403, csp=SCRIPT_CSP, message=message, **chrome)


def _unavailable(request: web.Request, who: csrf.Visitor, exc: Exception) -> web.Response:
    text = f"The grant store is unavailable ({type(exc).__name__}); try again shortly."
    return page(
        request,
        "forbidden.html",
        503,
        csp=SCRIPT_CSP,
        message=text,
        **nav(request, who.identity, ""),
    )


async def my_access(request: web.Request) -> web.Response:
    """The visitor's own grants (with extend and relinquish), requests and history."""
    who = await _signed_in(request)
    flow = app_state(request).workflow
    try:
        grants = await flow.mine(who.identity)
    except RedisError as exc:
        return _unavailable(request, who, exc)
    policy = flow.policy()
    pending = [g for g in grants if g.state == "pending"]
    waiting = {g.extends: g for g in pending if g.kind == "extension"}
    active = sorted(
        (g for g in grants if g.state == "active" and g.kind == "grant"),
        key=lambda g: g.expires_at,
    )
    history = [g for g in grants if g.state not in ("active", "pending")][:_HISTORY]
    rows = [
        {"grant": g, "extend": _extend_options(policy, g), "waiting": waiting.get(g.id)}
        for g in active
    ]
    return await _show(
        request, who, "access.html", "access", active=rows, pending=pending, history=history,
        fmt=format_duration,
    )  # fmt: skip


def _extend_options(policy: Policy, grant: Grant) -> dict[str, Any] | None:
    """The extensions the grant's rule offers that keep it within its maximum, if any."""
    ent = policy.entitlement(grant.entitlement) if grant.entitlement else None
    if ent is None or grant.break_glass:
        return None
    used = grant.expires_at - (grant.activated_at or grant.created_at)
    offered = [d for d in ent.durations if used + d <= ent.max_duration + 0.5]
    return {
        "durations": [(f"{d:g}", format_duration(d)) for d in offered],
        "needs_approval": ent.extend_requires_approval,
        "max": format_duration(ent.max_duration),
    }


async def approvals(request: web.Request) -> web.Response:
    """Pending requests the visitor may decide, and break-glass uses awaiting their review."""
    who = await _signed_in(request)
    flow = app_state(request).workflow
    try:
        pending = await flow.pending_for(who.identity)
        unreviewed = await flow.unreviewed(who.identity)
    except RedisError as exc:
        return _unavailable(request, who, exc)
    me = who.identity.subject
    rows = [
        {
            "grant": g,
            "mine": g.user == me,
            "approved": any(a.by == me for a in g.approvals),
        }
        for g in sorted(pending, key=lambda g: g.created_at)
    ]
    return await _show(
        request, who, "approvals.html", "approvals", pending=rows,
        reviews=_reviews(who, unreviewed), fmt=format_duration,
    )  # fmt: skip


def _reviews(who: csrf.Visitor, unreviewed: list[Grant]) -> list[dict[str, Any]]:
    return [{"grant": g, "mine": g.user == who.identity.subject} for g in unreviewed]


async def admin(request: web.Request) -> web.Response:
    """Every active grant, filtered by user, scope and how soon it expires, and every
    break-glass use awaiting review; admins only."""
    who = await _signed_in(request)
    flow = app_state(request).workflow
    if not flow.is_admin(who.identity):
        return _forbidden(request, who, "The admin page is for jitgate's admins.")
    filters = _filters(request.query)
    try:
        grants = await flow.all(who.identity, states=("active",))
        unreviewed = await flow.unreviewed(who.identity)
    except RedisError as exc:
        return _unavailable(request, who, exc)
    now = time.time()
    shown = [g for g in grants if _matches(g, filters, now)]
    shown.sort(key=lambda g: g.expires_at)
    return await _show(
        request, who, "admin.html", "admin", grants=shown, total=len(grants), filters=filters,
        within=WITHIN, reviews=_reviews(who, unreviewed),
    )  # fmt: skip


def _filters(source: Mapping[str, str]) -> dict[str, str]:
    within = source.get("within", "")
    return {
        "user": source.get("user", "").strip()[:200],
        "scope": source.get("scope", "").strip()[:200],
        "within": within if within in dict(WITHIN) else "",
    }


def _matches(grant: Grant, filters: Mapping[str, str], now: float) -> bool:
    if filters["user"] and filters["user"].lower() not in grant.user.lower():
        return False
    if filters["scope"] and filters["scope"].lower() not in grant.scope.lower():
        return False
    return not filters["within"] or grant.expires_at - now <= float(filters["within"])


async def checked_form(
    request: web.Request, who: csrf.Visitor, nothing: str
) -> MultiDictProxy[Any] | web.Response:
    """Return a posted form that passed the origin and CSRF checks, or the 403 page saying
    that nothing was `nothing` (changed, requested)."""
    # Both checks, before the body is acted on: the origin check stops a cross-site post
    # from a browser that sends Origin, the token one that sends none (and any replay
    # of a form made for another credential).
    if not same_origin(request):
        return _forbidden(request, who, f"Cross-site form refused: nothing was {nothing}.")
    form = await request.post()
    if not await csrf.valid(request, who, _field(form, csrf.FIELD)):
        return _forbidden(
            request, who, "This form has expired or did not come from jitgate: nothing was"
            f" {nothing}. Reload the page and try again.",
        )  # fmt: skip
    return form


async def act(request: web.Request) -> web.StreamResponse:
    """Apply one form's action through the Workflow and go back to the page it came from."""
    where = request.match_info["page"]
    who = await _signed_in(request)
    settings = app_state(request).settings
    form = await checked_form(request, who, "changed")
    if isinstance(form, web.Response):
        return form
    action = _field(form, "action")
    if action not in ACTIONS[where]:
        return _forbidden(request, who, f"The {where} page offers no action {action[:40]!r}.")
    flow = app_state(request).workflow
    grant_id = request.match_info["grant_id"]
    try:
        kind, text = "ok", await _apply(flow, who.identity, action, grant_id, form)
    except WorkflowError as exc:
        kind, text = "error", _FRIENDLY.get(exc.code, exc.message)
    except RedisError as exc:
        kind, text = "error", f"The grant store is unavailable ({type(exc).__name__}); try again."
    back = URL(f"{settings.prefix}/{where}")
    if where == "admin":  # keep the admin's filters
        back = back.with_query({k: v for k, v in _filters(_fields(form, "f_")).items() if v})
    response = web.HTTPSeeOther(str(back), headers={"Cache-Control": "no-store"})
    await csrf.set_flash(request, response, who, kind, text)
    raise response


async def _apply(
    flow: Workflow, ident: Identity, action: str, grant_id: str, form: MultiDictProxy[Any]
) -> str:
    """Make the Workflow call one action stands for; return what to tell the visitor."""
    comment = _field(form, "comment")
    if action == "approve":
        g = await flow.approve(ident, grant_id, comment)
        if g.state == "pending":
            left = g.needed - len(g.approvals)
            return f"Approval recorded; {g.user}'s request needs {left} more."
        if g.kind == "extension":
            return f"Approved: {g.user}'s access to {g.scope} is extended."
        return f"Approved: {g.user} has access to {g.scope} until {_clock(g.expires_at)}."
    if action == "deny":
        g = await flow.deny(ident, grant_id, comment)
        return f"Denied {g.user}'s request for {g.scope}."
    if action == "withdraw":
        # Withdrawing is the requester's deny; the workflow would also let an approver
        # deny here, but this page only offers one's own requests.
        g = await flow.show(ident, grant_id)
        if g.user != ident.subject:
            raise WorkflowError(403, "not_holder", "only the requester may withdraw a request")
        g = await flow.deny(ident, grant_id, comment)
        return f"Withdrawn: your request for {g.scope}."
    if action == "review":
        g = await flow.review(ident, grant_id, comment)
        return f"Review recorded for {g.user}'s break-glass access to {g.scope}."
    if action == "revoke":
        g = await flow.revoke(ident, grant_id, comment)
        return f"Revoked {g.user}'s access to {g.scope}."
    if action == "relinquish":
        g = await flow.relinquish(ident, grant_id, comment)
        return f"You gave up your access to {g.scope}."
    try:
        extra = parse_duration(_field(form, "duration"))
    except ValueError:
        raise WorkflowError(400, "bad_request", "Choose how long to extend by.") from None
    g = await flow.extend(ident, grant_id, extra, comment)
    if g.kind == "extension":
        return f"Extension by {format_duration(extra)} requested; it needs approval."
    return f"Extended: your access to {g.scope} lasts until {_clock(g.expires_at)}."


def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""  # a file upload is no answer


def _fields(form: Mapping[str, Any], prefix: str) -> dict[str, str]:
    return {k.removeprefix(prefix): _field(form, k) for k in form if k.startswith(prefix)}


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


async def home(request: web.Request) -> web.StreamResponse:
    """The prefix itself leads to My access."""
    raise web.HTTPFound(f"{app_state(request).settings.prefix}/access")


def add_routes(app: web.Application) -> None:
    """Register the pages and their form endpoints on jitgate's own sub-application."""
    app.router.add_get("/", home)
    app.router.add_get("/access", my_access)
    app.router.add_get("/approvals", approvals)
    app.router.add_get("/admin", admin)
    app.router.add_post(r"/{page:access|approvals|admin}/{grant_id}", act)
