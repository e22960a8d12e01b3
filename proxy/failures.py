"""jitgate's own answers when a request cannot be forwarded: the upstream failed (502,
504), or the client's body is over its limit (413). JSON for scripts, a small page (or
plain text) for browsers, as for a refusal."""

from __future__ import annotations

import html

from aiohttp import web

from .hygiene import wants_html

_FAILURE_ERRORS = {502: "bad_gateway", 504: "gateway_timeout"}
_FAILURE_PAGE = (
    "<!doctype html><html lang=en><meta charset=utf-8><title>{status} {title}</title>"
    "<h1>{title}</h1><p>{text}</p><p>Try again in a moment.</p></html>\n"
)


def failure_response(request: web.Request, status: int, kind: str, text: str) -> web.Response:
    """A JSON answer for scripts and a small page for browsers (as for a refusal)."""
    headers = {"Cache-Control": "no-store"}
    if wants_html(request):
        title = "Bad Gateway" if status == 502 else "Gateway Timeout"
        page = _FAILURE_PAGE.format(status=status, title=title, text=html.escape(text))
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)
    payload = {"error": _FAILURE_ERRORS[status], "kind": kind, "message": text}
    return web.json_response(payload, status=status, headers=headers)


def too_large(request: web.Request, limit: int) -> web.Response:
    text = f"jitgate: request body over listen.max_body_bytes ({limit})"
    if wants_html(request):
        response = web.Response(status=413, text=text)
    else:
        payload = {"error": "body_too_large", "message": text}
        response = web.json_response(payload, status=413)
    response.force_close()  # the rest of the body is not read
    return response
