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
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from ..audit import query as auditquery
from ..audit.store import AuditStore
from ..grants import STATES, Grant
from ..identity import Identity
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
        page = await store.query(q)
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
    app.router.add_get("/api/openapi.json", openapi)


def openapi_document(prefix: str) -> dict[str, Any]:
    """Describe the API as OpenAPI 3.1."""
    ref = {"$ref": "#/components/schemas/Grant"}
    listing = {"type": "object", "properties": {"grants": {"type": "array", "items": ref}}}
    err = {"description": "error", "content": _json({"$ref": "#/components/schemas/Error"})}
    errors = {str(s): err for s in (400, 401, 403, 404, 409)}
    grant_id = {"name": "grant_id", "in": "path", "required": True, "schema": {"type": "string"}}
    one = {"200": {"description": "the grant", "content": _json(ref)}, **errors}
    many = {"200": {"description": "grants", "content": _json(listing)}, **errors}

    def action(summary: str, body: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "parameters": [grant_id],
                "requestBody": {"content": _json(body)},
                "responses": {**one, **more},
            }
        }

    comment = {"type": "object", "properties": {"comment": {"type": "string"}}}
    duration: dict[str, Any] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    extend = {
        "type": "object",
        "required": ["duration"],
        "properties": {"duration": duration, "comment": {"type": "string"}},
    }
    paths: dict[str, Any] = {
        "/api/requests": {
            "post": {
                "summary": "Request access to a scope",
                "requestBody": {
                    "required": True,
                    "content": _json({"$ref": "#/components/schemas/AccessRequest"}),
                },
                "responses": {
                    "201": {"description": "pending or active", "content": _json(ref)},
                    **errors,
                },
            }
        },
        "/api/grants": {
            "get": {
                "summary": "List every grant (admins)",
                "parameters": [
                    {"name": "user", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "comma-separated states",
                    },
                ],
                "responses": many,
            }
        },
        "/api/grants/mine": {
            "get": {
                "summary": "My grants and requests",
                "responses": many,
            }
        },
        "/api/grants/pending": {
            "get": {
                "summary": "Pending requests I may decide",
                "responses": many,
            }
        },
        "/api/grants/unreviewed": {
            "get": {
                "summary": "Break-glass grants awaiting review that I may review",
                "responses": many,
            }
        },
        "/api/grants/{grant_id}": {
            "get": {
                "summary": "Show one grant",
                "parameters": [grant_id],
                "responses": one,
            }
        },
        "/api/grants/{grant_id}/approve": action(
            "Approve a pending request; the last approval needed activates it, or applies an"
            " extension request to its grant",
            comment,
        ),
        "/api/grants/{grant_id}/deny": action("Deny (or withdraw) a pending request", comment),
        "/api/grants/{grant_id}/revoke": action("Revoke an active grant (admins)", comment),
        "/api/grants/{grant_id}/relinquish": action("Give up one's own active grant", comment),
        "/api/grants/{grant_id}/extend": action(
            "Extend one's own active grant within the maximum; where extensions need approval,"
            " file an extension request (202, kind extension, pending) that approvers decide",
            extend,
            **{"202": {"description": "the pending extension request", "content": _json(ref)}},
        ),
        "/api/grants/{grant_id}/review": action(
            "Review break-glass access afterwards (an approver of its rule or an admin)", comment
        ),
        "/api/audit": {
            "get": {
                "summary": "Query the audit trail (admins); every given filter must hold",
                "parameters": [
                    *(
                        {
                            "name": name,
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": text,
                        }
                        for name, text in _AUDIT_FILTERS
                    ),
                    {
                        "name": "event",
                        "in": "query",
                        "description": "event type; repeat or comma-separate",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "explode": True,
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": auditquery.MAX_LIMIT,
                        },
                    },
                    {
                        "name": "order",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["asc", "desc"]},
                    },
                    {
                        "name": "format",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["json", "jsonl", "csv"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "records; the next page's cursor in `next` (json)"
                        " or the X-Next-Cursor header (jsonl, csv)",
                        "content": {
                            **_json({"$ref": "#/components/schemas/AuditPage"}),
                            "application/x-ndjson": {"schema": {"type": "string"}},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **errors,
                },
            }
        },
        "/api/audit/grants/{grant_id}/summary": {
            "get": {
                "summary": "What was done under one grant: lifecycle, requests, bytes,"
                " resources (admins)",
                "parameters": [grant_id],
                "responses": {
                    "200": {"description": "the summary", "content": _json({"type": "object"})},
                    **errors,
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "jitgate access API", "version": "1"},
        "servers": [{"url": prefix}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "AccessRequest": {
                    "type": "object",
                    "required": ["scope"],
                    "properties": {
                        "scope": {"type": "string", "examples": ["recording:1/demo-1"]},
                        "reason": {"type": "string"},
                        "ticket": {"type": "string"},
                        "duration": duration,
                        "break_glass": {"type": "boolean"},
                    },
                },
                "Grant": {
                    "type": "object",
                    "required": ["id", "user", "scope", "state"],
                    "properties": {
                        "id": {"type": "string"},
                        "user": {"type": "string"},
                        "scope": {"type": "string"},
                        "state": {"type": "string", "enum": list(_STATES)},
                        "kind": {"type": "string", "enum": ["grant", "extension"]},
                        "extends": {
                            "type": "string",
                            "description": "an extension request's grant",
                        },
                        "break_glass": {"type": "boolean"},
                        "reviewed_by": {"type": "string"},
                        "reviewed_at": {"type": ["number", "null"]},
                        "review_comment": {"type": "string"},
                    },
                    "additionalProperties": True,
                },
                "AuditPage": {
                    "type": "object",
                    "required": ["records", "next"],
                    "properties": {
                        "records": {"type": "array", "items": {"type": "object"}},
                        "next": {"type": ["string", "null"]},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


_AUDIT_FILTERS = (
    ("user", "whose access (the subject)"),
    ("scope", "exact scope, e.g. recording:1/demo-1"),
    ("recording", "recording id"),
    ("grant", "grant id"),
    ("since", "from: 2026-10-01, ISO time, unix seconds or a duration ago (30d)"),
    ("until", "before: same forms as since"),
    ("cursor", "the next cursor of the previous page"),
)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
