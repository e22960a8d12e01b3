"""jitgate's own pages and endpoints under the prefix; nothing here is on the byte path.

- `rendering`: templates, filters and the pages' content security policies.
- `views`: sign-in with a token and what every page shares; `signin`: OIDC sign-in.
- `accesspages`, `requestpages`, `auditpage`: My access, Approvals, Admin, the request
  and pending pages, the audit pages.
- `refusal`: what the gate's refusals look like, as a page or as JSON.
- `csrf`, `origin`: form tokens and flash messages, the same-origin check.
- `api`: the JSON API (described by openapi.yaml); `ops`: health, readiness, metrics.

It reads the application's state (state.py), and never imports forward, gate or live.
"""

from aiohttp import web

from . import accesspages, requestpages
from .rendering import CSP, SCRIPT_CSP, STATIC_DIR, render, setup

__all__ = ["CSP", "SCRIPT_CSP", "STATIC_DIR", "add_routes", "render", "setup"]


def add_routes(app: web.Application) -> None:
    """Register the access pages and the request pages on jitgate's own sub-app."""
    accesspages.add_routes(app)
    requestpages.add_routes(app)
