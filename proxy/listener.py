"""How jitgate listens: the limits its HTTP server holds clients to, and one log line for
a request it could not parse.

A request line over `listen.max_line_bytes` is answered 414, a header line over
`listen.max_field_bytes` or more than `listen.max_headers` headers 431 (`over_limits`,
asked first by the gate and by jitgate's own endpoints). aiohttp's parser, which answers
400 to whatever it refuses, is set to twice those limits: past them, or for anything else
it cannot parse, the client gets its 400 and the connection is closed. aiohttp logs that
at ERROR with a traceback, which a client can cause at will; `BadRequestLine` turns each
into one WARNING line naming the peer and what was wrong, the form `over_limits`'s
answers are logged in too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .settings import ListenSettings

log = logging.getLogger("jitgate.listen")


def server_options(listen: ListenSettings) -> dict[str, Any]:
    """The keyword arguments of aiohttp's request handler: its parser's limits, twice
    `listen`'s (within them `over_limits` answers), and the idle keep-alive timeout."""
    return {
        "max_line_size": 2 * listen.max_line_bytes,
        "max_field_size": 2 * listen.max_field_bytes,
        "max_headers": 2 * listen.max_headers,
        "keepalive_timeout": listen.keepalive_timeout,
    }


def over_limits(request: web.Request, listen: ListenSettings) -> tuple[int, str] | None:
    """414 or 431 and why, for a request over `listen`'s limits; None within them."""
    line = len(request.method) + len(request.raw_path) + 10  # "GET " target " HTTP/1.1"
    if line > listen.max_line_bytes:
        return 414, f"request line of {line} bytes (listen.max_line_bytes: {listen.max_line_bytes})"
    raw = request.raw_headers
    if len(raw) > listen.max_headers:
        return 431, f"{len(raw)} headers (listen.max_headers: {listen.max_headers})"
    for name, value in raw:
        size = len(name) + len(value) + 2  # "Name: value"
        if size > listen.max_field_bytes:
            what = name.decode("latin-1")[:64]
            limit = listen.max_field_bytes
            return 431, f"header {what!r} of {size} bytes (listen.max_field_bytes: {limit})"
    return None


def refuse_over_limits(request: web.Request, status: int, why: str) -> web.Response:
    """One WARNING line and the answer, the connection closed after it."""
    log.warning("bad request from %s answered %d: %s", request.remote, status, why)
    response = web.Response(status=status, text=f"jitgate: {why}\n")
    response.force_close()
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def limits_middleware(listen: ListenSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """For jitgate's own endpoints: `over_limits` before any handler."""

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        over = over_limits(request, listen)
        if over is not None:
            return refuse_over_limits(request, *over)
        return await handler(request)

    return limits


class BadRequestLine(logging.Filter):
    """On aiohttp's server log: a request its parser refused becomes one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        text = " ".join(str(exc.message).split())
        if len(text) > 200:
            text = text[:200] + "..."
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "bad request from %s answered %d: %s", (peer, exc.code, text)
        record.exc_info = record.exc_text = None
        return True


def quiet_bad_requests() -> None:
    """Install `BadRequestLine` on aiohttp's server log (once)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestLine) for f in server_log.filters):
        server_log.addFilter(BadRequestLine())
