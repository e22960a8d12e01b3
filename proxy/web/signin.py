"""OIDC sign-in and sign-out for browsers: the redirect to the provider, its callback, logout."""

from __future__ import annotations

import logging

from aiohttp import web
from yarl import URL

from .. import audit
from ..identity import IdentityError
from ..identity.oidc import LoginError, OidcClient, Pending
from ..state import app_state
from .origin import same_origin
from .rendering import CSP
from .views import page, safe_next, signed_in

log = logging.getLogger("jitgate.signin")

STATE_COOKIE = "jitgate_oidc"  # the logins in flight, encrypted (identity/oidc.py)


def _client(request: web.Request) -> OidcClient:
    oidc = app_state(request).oidc
    if oidc is None:
        raise web.HTTPNotFound(text="jitgate: OIDC sign-in is not configured (identity.oidc)\n")
    return oidc


def _set_state(request: web.Request, response: web.StreamResponse, pending: list[Pending]) -> None:
    settings = app_state(request).settings
    oidc = _client(request)
    secure = settings.identity.session.secure if settings.identity.session else True
    path = f"{settings.prefix}/"
    if not pending:
        response.del_cookie(STATE_COOKIE, path=path)
        return
    response.set_cookie(
        STATE_COOKIE,
        oidc.pack(pending),
        max_age=int(oidc.settings.login_timeout),
        path=path,  # only jitgate's own endpoints ever see it
        secure=secure,
        httponly=True,
        samesite="Lax",  # the provider's redirect back is a top-level GET: Lax is sent
    )


async def oidc_login(request: web.Request) -> web.StreamResponse:
    """Send the browser to the provider, remembering (in its state cookie) where to return."""
    oidc = _client(request)
    target = safe_next(request.query.get("next"), app_state(request).settings.prefix)
    try:
        url, pending = await oidc.begin(target)
    except LoginError as exc:
        log.warning("sign-in not started: %s", exc)
        return _failed(request, 503, str(exc), target)
    held = oidc.live(oidc.unpack(request.cookies.get(STATE_COOKIE)))
    response = web.HTTPFound(url)
    response.headers["Cache-Control"] = "no-store"
    _set_state(request, response, [*held[-3:], pending])
    raise response


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    """The provider's redirect back: check the state, redeem the code, start the session."""
    oidc = _client(request)
    sessions = app_state(request).sessions
    assert sessions is not None  # identity.oidc needs a session store
    held = oidc.unpack(request.cookies.get(STATE_COOKIE))
    state = request.query.get("state", "")
    pending, rest = oidc.take(held, state) if state else (None, held)
    rest = oidc.live(rest)
    target = pending.next if pending is not None else "/"
    try:
        if "error" in request.query:
            error = request.query.get("error", "")[:60]
            raise LoginError(f"the identity provider refused the sign-in: {error}")
        if not state:
            raise LoginError("the callback carries no state")
        if pending is None:
            # Unknown, already used, or from another browser: never redeem its code.
            raise LoginError("unknown or already used sign-in state")
        claims, id_token = await oidc.finish(request.query, pending)
        verifier = app_state(request).config.verifier
        try:
            ident = verifier.identity_of(claims)
        except IdentityError as exc:
            raise LoginError(f"ID token: {exc}") from None
    except LoginError as exc:
        _audit(request, "session.refused", None, str(exc))
        failed = _failed(request, 400 if pending is None else 401, str(exc), target)
        # Whatever happened, the state is spent: a second try needs a new sign-in.
        _set_state(request, failed, rest)
        return failed
    # Checked again: the cookie is ours, but the path must still be one we would accept.
    response = web.HTTPSeeOther(safe_next(pending.next, app_state(request).settings.prefix))
    response.headers["Cache-Control"] = "no-store"
    await sessions.start(request, response, ident, id_token)
    _set_state(request, response, rest)
    _audit(request, "session.started", ident.subject, "signed in with OIDC")
    raise response


async def logout_form(request: web.Request) -> web.Response:
    """Ask before signing out: sign-out is a POST, which another site cannot make for us."""
    ident = await signed_in(request)
    return page(
        request,
        "logout.html",
        csp=await _logout_csp(request),
        user=ident.subject if ident else None,
    )


async def logout(request: web.Request) -> web.StreamResponse:
    """End the session here and, where the provider offers it, at the provider too."""
    settings = app_state(request).settings
    oidc = app_state(request).oidc
    if not same_origin(request):
        raise web.HTTPForbidden(text="jitgate: cross-site sign-out refused\n")
    response = web.HTTPSeeOther(f"{settings.prefix}/login")
    response.headers["Cache-Control"] = "no-store"
    ended = None
    sessions = app_state(request).sessions
    if sessions is not None:
        ended = await sessions.end(request, response)
    if settings.identity.cookie:
        response.del_cookie(settings.identity.cookie, path="/")
    if ended is not None:
        _audit(request, "session.ended", ended.identity.subject, "signed out")
    if oidc is not None and ended is not None:
        url = await oidc.logout_url(ended.id_token)
        if url is not None:
            response.headers["Location"] = url
    raise response


async def _logout_csp(request: web.Request) -> str:
    # Browsers apply form-action to the redirect a form post leads to, and sign-out goes
    # on to the provider's end-session endpoint.
    oidc = app_state(request).oidc
    url = await oidc.logout_url(None) if oidc is not None else None
    if url is None:
        return CSP
    return CSP.replace("form-action 'self'", f"form-action 'self' {URL(url).origin()}")


def _failed(request: web.Request, status: int, reason: str, target: str) -> web.Response:
    prefix = app_state(request).settings.prefix
    again = str(URL(f"{prefix}/oidc/login").with_query(next=target))
    return page(request, "signin-failed.html", status=status, user=None, reason=reason, again=again)


def _audit(request: web.Request, event: str, user: str | None, reason: str) -> None:
    app_state(request).audit.emit(
        audit.record(
            event,
            actor=user,
            user=user,
            reasons=[reason],
            client_ip=request.remote,
            user_agent=request.headers.get("User-Agent"),
        )
    )
