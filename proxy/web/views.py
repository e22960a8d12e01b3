"""jitgate's own pages under the prefix: how to request access, token sign-in and sign-out."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import AUTHORIZER, SETTINGS
from ..identity import Identity, IdentityError
from ..policy import format_duration
from . import CSP, render


def safe_next(value: str | None) -> str:
    """Return a same-origin path to go back to, or '/' for anything that could leave the site."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    lowered = value.lower()
    if any(c in value for c in "\\\r\n\t") or "%2f" in lowered[:4] or "%5c" in lowered[:4]:
        return "/"
    return value


def page(request: web.Request, template: str, status: int = 200, **context: object) -> web.Response:
    return web.Response(
        status=status,
        text=render(template, prefix=request.config_dict[SETTINGS].prefix, **context),
        content_type="text/html",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
    )


async def signed_in(request: web.Request) -> Identity | None:
    """Return the verified identity of a request, if it carries a valid one."""
    verifier = request.config_dict[AUTHORIZER][0].verifier
    try:
        found = await verifier.identify(request.headers, request.cookies, request.remote)
    except IdentityError:
        return None
    return found.identity if found is not None else None


async def request_access(request: web.Request) -> web.Response:
    """Explain how to obtain a grant for the scope a refusal named, and under which rules."""
    ident = await signed_in(request)
    scope = request.query.get("scope")
    policy = request.config_dict[AUTHORIZER][0].policy
    rules = []
    for ent in policy.entitlements_for_scope(scope) if scope else ():
        rules.append(
            {
                "ent": ent,
                "yours": ident is not None and ent.admits(ident.subject, ident.groups),
                "durations": ", ".join(format_duration(d) for d in ent.durations),
            }
        )
    return page(
        request,
        "request.html",
        user=ident.subject if ident else None,
        scope=scope,
        rules=rules,
    )


async def login_form(request: web.Request) -> web.Response:
    target = safe_next(request.query.get("next"))
    return page(request, "login.html", user=None, next=target, error=None)


async def login(request: web.Request) -> web.Response:
    """Check a pasted token and keep it in the identity cookie for the browser."""
    settings = request.config_dict[SETTINGS]
    origin = request.headers.get("Origin")
    if origin is not None and origin != str(request.url.origin()):
        # A sign-in posted from another site would sign the browser in as someone else.
        raise web.HTTPForbidden(text="jitgate: cross-site sign-in refused\n")
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = safe_next(str(form.get("next", "/")))
    cookie = settings.identity.cookie
    if cookie is None:
        raise web.HTTPNotFound(text="jitgate: cookie sign-in is disabled (identity.cookie)\n")
    try:
        ident = await request.config_dict[AUTHORIZER][0].verifier.verify(token)
    except IdentityError as exc:
        return page(request, "login.html", status=401, user=None, next=target, error=str(exc))
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


async def logout(request: web.Request) -> web.Response:
    settings = request.config_dict[SETTINGS]
    response = web.HTTPSeeOther(f"{settings.prefix}/login")
    if settings.identity.cookie:
        response.del_cookie(settings.identity.cookie, path="/")
    raise response
