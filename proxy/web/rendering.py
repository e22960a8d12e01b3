"""Rendering: the page templates, the filters they use and the pages' content security policies."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import csrf

STATIC_DIR = Path(__file__).parent / "static"

# The pages load nothing from elsewhere and run no script.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# The access pages run one script of jitgate's own (a countdown), never an inline one.
SCRIPT_CSP = f"{CSP}; script-src 'self'"


def _when(epoch: float) -> str:
    """Write a unix time as people read it on the pages (UTC, to the second)."""
    if not epoch:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def setup(app: web.Application) -> None:
    """Give the application (the gate's refusals, and the pages' sub-application) the page
    templates and the CSRF key cache."""
    app[csrf.KEYS] = csrf.KeyCache()
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("proxy.web", "templates"),
        undefined=jinja2.StrictUndefined,
        filters={"when": _when, "iso": _iso},
        default_helpers=False,
    )


def render(request: web.Request, template: str, **context: Any) -> str:
    """Render one page template for a request."""
    return aiohttp_jinja2.render_string(template, request, context)
