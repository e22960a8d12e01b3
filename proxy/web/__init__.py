"""Server-rendered pages and their static files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

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


def render(template: str, **context: Any) -> str:
    """Render one page template."""
    return _env.get_template(template).render(**context)
