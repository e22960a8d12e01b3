"""The JSON API under `{prefix}/api/`: the access workflow for people and scripts.

Callers authenticate like any request (bearer token, jitgate's cookie, or a trusted SSO
proxy's headers). A request that changes state and is authenticated by the cookie or by
SSO headers must come from jitgate's own origin (Origin or Sec-Fetch-Site), so another
site cannot act for a signed-in browser.
Errors are JSON: {"error": code, "message": text}.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import yaml
from aiohttp import web
from redis.exceptions import RedisError

from ..audit import query as auditquery
from ..audit import subjects
from ..audit.store import AuditStore
from ..grants import STATES, Grant
from ..identity import Identity
from ..settings import Settings
from ..settings.read import parse_duration
from ..state import app_state
from ..workflow import WorkflowError
from .origin import same_origin

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STATES = STATES
_ACTIONS = ("approve", "deny", "revoke", "relinquish", "extend", "review")


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _grant(grant: Grant) -> dict[str, Any]:
    return grant.to_dict()


async def _identity(request: web.Request, *, changes_state: bool) -> Identity:
    caller = await app_state(request).identify(request)
    found = caller.found
    if found is None:
        raise WorkflowError(401, "unauthenticated", caller.reason)
    # The cookies (token, session), and an SSO proxy's headers, come with any request the
    # browser makes.
    if changes_state and found.ambient and not same_origin(request):
        raise WorkflowError(403, "cross_site", "cross-site request refused")
    return found.identity


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise WorkflowError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise WorkflowError(400, "bad_request", "the body must be a JSON object")
    return data


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WorkflowError(400, "bad_request", f"{key} must be a string")
    return value


def _seconds(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise WorkflowError(400, "bad_request", f"{key} must be a duration such as 1h or 900")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise WorkflowError(400, "bad_request", f"{key}: {exc}") from None


def _api(changes_state: bool) -> Callable[[Callable[..., Awaitable[Any]]], Handler]:
    """Wrap a handler: identity first, WorkflowError as a JSON error, the result as JSON."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                ident = await _identity(request, changes_state=changes_state)
                result, status = await fn(request, ident)
            except WorkflowError as exc:
                return error(exc.status, exc.code, exc.message)
            if isinstance(result, web.StreamResponse):  # CSV or JSON lines, made by the handler
                return result
            return web.json_response(result, status=status, headers={"Cache-Control": "no-store"})

        return handler

    return wrap


@_api(changes_state=True)
async def create_request(request: web.Request, ident: Identity) -> tuple[Any, int]:
    data = await _body(request)
    break_glass = data.get("break_glass", False)
    if not isinstance(break_glass, bool):
        raise WorkflowError(400, "bad_request", "break_glass must be true or false")
    grant = await app_state(request).workflow.request(
        ident,
        _str(data, "scope"),
        reason=_str(data, "reason"),
        duration=_seconds(data, "duration"),
        ticket=_str(data, "ticket") or None,
        break_glass=break_glass,
    )
    return _grant(grant), 201


@_api(changes_state=True)
async def act(request: web.Request, ident: Identity) -> tuple[Any, int]:
    action = request.match_info["action"]
    if action not in _ACTIONS:
        raise WorkflowError(404, "not_found", f"no action {action!r}")
    grant_id = request.match_info["grant_id"]
    data = await _body(request)
    comment = _str(data, "comment")
    flow = app_state(request).workflow
    if action == "extend":
        extra = _seconds(data, "duration")
        if extra is None:
            raise WorkflowError(400, "bad_request", "duration is required")
        grant = await flow.extend(ident, grant_id, extra, comment)
        if grant.kind == "extension":  # needs approval: a pending extension request
            return _grant(grant), 202
    else:
        grant = await getattr(flow, action)(ident, grant_id, comment)
    return _grant(grant), 200


@_api(changes_state=False)
async def show(request: web.Request, ident: Identity) -> tuple[Any, int]:
    grant = await app_state(request).workflow.show(ident, request.match_info["grant_id"])
    return _grant(grant), 200


@_api(changes_state=False)
async def mine(request: web.Request, ident: Identity) -> tuple[Any, int]:
    grants = await app_state(request).workflow.mine(ident)
    return {"grants": [_grant(g) for g in grants]}, 200


@_api(changes_state=False)
async def pending(request: web.Request, ident: Identity) -> tuple[Any, int]:
    grants = await app_state(request).workflow.pending_for(ident)
    return {"grants": [_grant(g) for g in grants]}, 200


@_api(changes_state=False)
async def unreviewed(request: web.Request, ident: Identity) -> tuple[Any, int]:
    grants = await app_state(request).workflow.unreviewed(ident)
    return {"grants": [_grant(g) for g in grants]}, 200


@_api(changes_state=False)
async def list_all(request: web.Request, ident: Identity) -> tuple[Any, int]:
    states = tuple(s for s in request.query.get("state", "").split(",") if s) or None
    for state in states or ():
        if state not in _STATES:
            raise WorkflowError(400, "bad_request", f"unknown state {state!r}")
    grants = await app_state(request).workflow.all(
        ident, user=request.query.get("user") or None, states=states
    )
    return {"grants": [_grant(g) for g in grants]}, 200


def _audit_store(request: web.Request, ident: Identity) -> AuditStore:
    if not app_state(request).workflow.is_admin(ident):
        raise WorkflowError(403, "forbidden", "the audit trail is for admins")
    store = app_state(request).audit_store
    if store is None:
        raise WorkflowError(404, "not_found", "the Redis audit stream is off (audit.redis: null)")
    return store


@_api(changes_state=False)
async def audit_query(request: web.Request, ident: Identity) -> tuple[Any, int]:
    store = _audit_store(request, ident)
    query = request.query
    fmt = query.get("format", "json")
    if fmt not in ("json", "jsonl", "csv"):
        raise WorkflowError(400, "bad_request", "format must be json, jsonl or csv")
    try:
        q = auditquery.parse(query.get, lambda name: query.getall(name, []))
        page = await store.query(subjects.with_subject(q, subjects.form_for(_settings(request))))
        why = await store.grant_reasons(str(r["grant_id"]) for r in page.records if "grant_id" in r)
    except ValueError as exc:  # a bad filter or cursor
        raise WorkflowError(400, "bad_request", str(exc)) from None
    except RedisError as exc:
        raise WorkflowError(503, "unavailable", f"audit store unavailable: {exc}") from None
    auditquery.annotate(page.records, why)
    if fmt == "json":
        return {"records": page.records, "next": page.next}, 200
    headers = {"Cache-Control": "no-store"}
    if page.next:
        headers["X-Next-Cursor"] = page.next
    content_type = "text/csv" if fmt == "csv" else "application/x-ndjson"
    text = auditquery.render(page.records, fmt)
    return web.Response(text=text, content_type=content_type, headers=headers), 200


@_api(changes_state=False)
async def audit_subject(request: web.Request, ident: Identity) -> tuple[Any, int]:
    """Who viewed one data subject's recordings, when, under which grant and why (a DSAR)."""
    store = _audit_store(request, ident)
    form = subjects.form_for(_settings(request))
    if form is None:
        raise WorkflowError(404, "not_found", "no metadata section: records name no data subject")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise WorkflowError(400, "bad_request", "format must be json or csv")
    given = request.match_info["subject"]
    try:
        since, until = (
            auditquery.parse_time(t) if (t := request.query.get(k)) else None
            for k in ("since", "until")
        )
        rep = await subjects.report(store, given, form.stored(given), since=since, until=until)
    except ValueError as exc:
        raise WorkflowError(400, "bad_request", str(exc)) from None
    except RedisError as exc:
        raise WorkflowError(503, "unavailable", f"audit store unavailable: {exc}") from None
    if fmt == "json":
        return rep, 200
    text = subjects.render(rep, "csv")
    disposition = 'attachment; filename="subject-access-report.csv"'
    headers = {"Cache-Control": "no-store", "Content-Disposition": disposition}
    return web.Response(text=text, content_type="text/csv", headers=headers), 200


def _settings(request: web.Request) -> Settings:
    return app_state(request).settings


@_api(changes_state=False)
async def audit_summary(request: web.Request, ident: Identity) -> tuple[Any, int]:
    store = _audit_store(request, ident)
    grant_id = request.match_info["grant_id"]
    try:
        summary = await store.summary(grant_id)
    except RedisError as exc:
        raise WorkflowError(503, "unavailable", f"audit store unavailable: {exc}") from None
    if summary is None:
        raise WorkflowError(404, "not_found", f"no audit records for grant {grant_id}")
    return summary, 200


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(app_state(request).settings.prefix))


def add_routes(app: web.Application) -> None:
    """Register the API on jitgate's own sub-application (mounted at the prefix)."""
    app.router.add_post("/api/requests", create_request)
    app.router.add_get("/api/grants", list_all)
    app.router.add_get("/api/grants/mine", mine)
    app.router.add_get("/api/grants/pending", pending)
    app.router.add_get("/api/grants/unreviewed", unreviewed)
    app.router.add_get("/api/grants/{grant_id}", show)
    app.router.add_post("/api/grants/{grant_id}/{action}", act)
    app.router.add_get("/api/audit", audit_query)
    app.router.add_get("/api/audit/grants/{grant_id}/summary", audit_summary)
    app.router.add_get("/api/audit/subjects/{subject}", audit_subject)
    app.router.add_get("/api/openapi.json", openapi)


# The OpenAPI document lives in openapi.yaml; only the server URL depends on the config.
_OPENAPI: dict[str, Any] = yaml.safe_load(
    resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
)


def openapi_document(prefix: str) -> dict[str, Any]:
    """Describe the API as OpenAPI 3.1, served under `prefix`."""
    return {**_OPENAPI, "servers": [{"url": prefix}]}
