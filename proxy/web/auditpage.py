"""The audit pages for admins: search the trail, see what was watched under a grant, export.

They read through the same code as `GET {prefix}/api/audit` (audit/query.py: parse with the
same filter names, AuditStore, the grants' reasons), and the export links are that API
itself with `format=csv` or `format=jsonl`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web
from redis.exceptions import RedisError
from yarl import URL

from ..audit import query as auditquery
from ..audit.pairs import fold
from ..audit.store import AuditStore
from ..audit.subjects import form_for, with_subject
from ..identity import Identity
from ..state import app_state
from .accesspages import nav
from .views import page, signed_in

EVENTS = (
    "access.allow", "access.done", "access.deny", "grant.requested", "grant.approved",
    "grant.denied", "grant.activated", "grant.extended", "grant.revoked", "grant.relinquished",
    "grant.expired", "grant.lapsed", "grant.reviewed", "break_glass",
)  # fmt: skip


async def _admin(request: web.Request) -> tuple[Identity, AuditStore | None]:
    """Return the signed-in admin and the store; otherwise raise the right answer."""
    ident = await signed_in(request)
    prefix = app_state(request).settings.prefix
    if ident is None:
        raise web.HTTPSeeOther(str(URL(f"{prefix}/login").with_query(next=request.path_qs)))
    if not app_state(request).workflow.is_admin(ident):
        raise web.HTTPForbidden(
            text=f"jitgate: the audit trail is for admins; you are {ident.subject}\n"
        )
    return ident, app_state(request).audit_store


async def audit_search(request: web.Request) -> web.Response:
    """Search form and results: who viewed what, when, and the reason given."""
    ident, store = await _admin(request)
    query = request.query
    form = {name: query.get(name, "") for name in auditquery.FILTERS}
    searched = any(form.values())
    records: list[dict[str, Any]] = []
    error, status, next_url = None, 200, None
    if store is None:
        error = "The Redis audit stream is off (audit.redis: null): nothing to search."
    elif searched:
        try:
            q = auditquery.parse(query.get, lambda name: query.getall(name, []))
            result = await store.query(with_subject(q, form_for(app_state(request).settings)))
            ids = (str(r["grant_id"]) for r in result.records if "grant_id" in r)
            auditquery.annotate(result.records, await store.grant_reasons(ids))
            records = fold(result.records)  # a request's decision and completion: one row
            if result.next:
                next_url = str(request.rel_url.update_query(cursor=result.next))
        except ValueError as exc:  # a filter that cannot be read
            error, status = str(exc), 400
        except RedisError as exc:
            error, status = f"The audit store is unavailable: {exc}", 503
    prefix = app_state(request).settings.prefix
    exports = {}
    if searched and not error:
        params = [(k, v) for k, v in query.items() if k not in ("cursor", "format")]
        base = URL(f"{prefix}/api/audit").with_query(params)
        exports = {fmt: str(base.update_query(format=fmt)) for fmt in ("csv", "jsonl")}
        if form["subject"]:  # the report to hand over: who viewed this person's recordings
            who = quote(form["subject"], safe="")
            dsar = URL(f"{prefix}/api/audit/subjects/{who}", encoded=True)
            times = [(k, form[k]) for k in ("since", "until") if form[k]]
            for fmt in ("csv", "json"):
                exports[f"dsar_{fmt}"] = str(dsar.with_query([*times, ("format", fmt)]))
    return page(
        request,
        "audit.html",
        status=status,
        **nav(request, ident, "audit"),
        form=form,
        events=EVENTS,
        searched=searched,
        records=records,
        error=error,
        next_url=next_url,
        exports=exports,
    )


async def audit_grant(request: web.Request) -> web.Response:
    """What was done under one grant: its lifecycle, requests, resources, bytes, times."""
    ident, store = await _admin(request)
    grant_id = request.match_info["grant_id"]
    summary, error, status = None, None, 200
    if store is None:
        error = "The Redis audit stream is off (audit.redis: null)."
    else:
        try:
            summary = await store.summary(grant_id)
        except RedisError as exc:
            error, status = f"The audit store is unavailable: {exc}", 503
        else:
            if summary is None:
                error, status = f"No audit records for grant {grant_id}.", 404
    return page(
        request,
        "audit-grant.html",
        status=status,
        **nav(request, ident, "audit"),
        grant_id=grant_id,
        s=summary,
        error=error,
    )


def add_routes(app: web.Application) -> None:
    """Register the audit pages on jitgate's own sub-application."""
    app.router.add_get("/audit", audit_search)
    app.router.add_get("/audit/grants/{grant_id}", audit_grant)
