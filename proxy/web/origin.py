"""Whether a request comes from jitgate's own pages: the check for ambient credentials.

A browser sends jitgate's cookies (and an SSO proxy's headers) with any request, also
one another site makes it send, so a request that changes state on their strength must
show that it comes from jitgate's own origin.
"""

from __future__ import annotations

from aiohttp import web

from ..state import app_state


def same_origin(request: web.Request) -> bool:
    """True if Origin is this request's origin (or `identity.oidc.public_url`), else
    Sec-Fetch-Site says so.

    `public_url` is how browsers reach jitgate when a TLS-terminating proxy in front
    makes the request look like plain http here.
    """
    oidc = app_state(request).settings.identity.oidc
    public_url = oidc.public_url if oidc is not None else None
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == str(request.url.origin()) or (
            public_url is not None and origin == public_url.rstrip("/")
        )
    return request.headers.get("Sec-Fetch-Site") == "same-origin"
