"""Server-rendered pages and their static files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("proxy.web", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

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


_env.filters["when"] = _when
_env.filters["iso"] = _iso


def render(template: str, **context: Any) -> str:
    """Render one page template."""
    return _env.get_template(template).render(**context)


def add_routes(app: web.Application) -> None:
    """Register the access pages and the request pages on jitgate's own sub-app."""
    # Imported here: the pages import render() and CSP from this module.
    from . import accesspages, requestpages

    accesspages.add_routes(app)
    requestpages.add_routes(app)
