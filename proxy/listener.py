"""How jitgate listens: the limits its HTTP server holds clients to, and one log line for
a request it could not parse.

aiohttp's server answers a request line or header over its limits, too many headers, or
anything else its parser refuses, with 400 and closes the connection; it logs that at
ERROR with a traceback, which a client can cause at will (a 9 KB bearer token is enough).
`BadRequestLine` turns each into one WARNING line naming the peer and what was wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from .settings import ListenSettings

log = logging.getLogger("jitgate.listen")


def server_options(listen: ListenSettings) -> dict[str, Any]:
    """The keyword arguments of aiohttp's request handler that carry `listen`'s limits."""
    return {
        "max_line_size": listen.max_line_bytes,
        "max_field_size": listen.max_field_bytes,
        "max_headers": listen.max_headers,
        "keepalive_timeout": listen.keepalive_timeout,
    }


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
