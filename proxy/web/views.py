"""jitgate's own pages under the prefix: token sign-in, and what every page shares."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from yarl import URL

from ..errors import BadPath
from ..identity import Identity, IdentityError
from ..paths import normalise, split_target
from ..state import app_state
from . import csrf
from .origin import same_origin
from .rendering import CSP, render

# Raw characters a return path may carry: printable ASCII that no browser or server
# reads as a separator (no space, backslash, quote or angle bracket).
_PATH_CHARS = frozenset(map(chr, range(0x21, 0x7F))) - frozenset('\\"<>`{}|^')


def safe_next(value: str | None, prefix: str | None = None) -> str:
    """Return a same-origin path to go back to, or '/' for anything that could leave the site.

    Only an absolute path is kept, and only in the normalised form the gate itself would
    decide on: `//host`, `/\\host`, a scheme, encoded `/` or `\\` (`/%2F%2Fhost`), control
    characters (tabs and newlines, which browsers drop) and dot segments that climb to
    `//host` all give '/'. Under `{prefix}/oidc/` it is '/' too: no sign-in loops.
    """
    if not value or len(value) > 2048 or not value.startswith("/"):
        return "/"
    if value.startswith(("//", "/\\")) or not all(c in _PATH_CHARS for c in value):
        return "/"
    try:
        raw_path, query = split_target(value)
        path = normalise(raw_path, reject_semicolons=False)
    except BadPath:
        return "/"
    # normalise() merged any "//" and resolved dot segments: the path cannot name a host.
    if prefix is not None and path.startswith(f"{prefix}/oidc/"):
        return "/"
    return path + (f"?{query}" if query else "")


def page(
    request: web.Request, template: str, status: int = 200, *, csp: str = CSP, **context: object
) -> web.Response:
    return web.Response(
        status=status,
        text=render(request, template, prefix=app_state(request).settings.prefix, **context),
        content_type="text/html",
        headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"},
    )


async def signed_in(request: web.Request) -> Identity | None:
    """Return the verified identity of a request, if it carries a valid one."""
    who = await csrf.visitor(request)
    return who.identity if who is not None else None


async def login_form(request: web.Request) -> web.Response:
    """The sign-in page: the identity provider's button (with OIDC) and the token form."""
    settings = app_state(request).settings
    target = safe_next(request.query.get("next"), settings.prefix)
    return page(request, "login.html", **_login_context(request, target))


def _login_context(request: web.Request, target: str) -> dict[str, Any]:
    settings = app_state(request).settings
    sso = None
    if app_state(request).oidc is not None:
        sso = str(URL(f"{settings.prefix}/oidc/login").with_query(next=target))
    return {
        "user": None,
        "next": target,
        "error": None,
        "sso_url": sso,
        "token_form": settings.identity.cookie is not None,
    }


async def login(request: web.Request) -> web.Response:
    """Check a pasted token and keep it in the identity cookie for the browser."""
    settings = app_state(request).settings
    if request.headers.get("Origin") is not None and not same_origin(request):
        # A sign-in posted from another site would sign the browser in as someone else.
        raise web.HTTPForbidden(text="jitgate: cross-site sign-in refused\n")
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = safe_next(str(form.get("next", "/")), settings.prefix)
    cookie = settings.identity.cookie
    if cookie is None:
        raise web.HTTPNotFound(text="jitgate: cookie sign-in is disabled (identity.cookie)\n")
    try:
        ident = await app_state(request).config.verifier.verify(token)
    except IdentityError as exc:
        context = {**_login_context(request, target), "error": str(exc)}
        return page(request, "login.html", status=401, **context)
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        cookie,
        token,
        httponly=True,
        samesite="Lax",
        secure=request.secure,
        path="/",
    )
    response.headers["X-Jitgate-User"] = ident.subject
    raise response
