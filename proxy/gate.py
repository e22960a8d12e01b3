"""The gate in front of every forwarded request: normalise, decide, forward, audit."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiohttp import web
from yarl import URL

from . import audit
from . import web as pages
from .authorize import Authorizer, Decision
from .errors import BadPath
from .forward import Forwarder, Outcome
from .identity.assertion import AssertionSigner
from .identity.session import Sessions
from .live import LiveConnections
from .metrics import Metrics
from .paths import normalise, split_target
from .settings import Settings
from .statusbar import StatusBar
from .web import requestpages
from .web.accesspages import nav
from .web.views import safe_next


def wants_html(request: web.Request) -> bool:
    """Tell a browser navigation from an API client by its Accept header."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept.split(",")[0]


class Gate:
    """Catch-all handler: nothing reaches the upstream except through `handle`."""

    def __init__(
        self,
        settings: Settings,
        authorizer: Callable[[], Authorizer],
        forwarder: Forwarder,
        audit_log: audit.AuditLog,
        metrics: Metrics,
        live: LiveConnections,
        assertion: AssertionSigner | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.settings = settings
        self.authorizer = authorizer
        self.forwarder = forwarder
        self.audit = audit_log
        self.metrics = metrics
        self.live = live
        self.assertion = assertion
        self.sessions = sessions
        # With OIDC, a browser without a session goes to the provider, not to a 401 page.
        self.sso_login = settings.identity.oidc is not None
        self.prefix = settings.prefix
        self.strict = settings.audit.strict
        fwd = settings.forward
        self.reject_underscores = fwd.reject_underscore_headers
        self.user_headers = fwd.user_headers
        self.status_bar = StatusBar(settings.prefix) if fwd.status_bar else None
        # Every header jitgate reads or sets for identity: a client's copy never goes up.
        names = set(fwd.identity_headers)
        trusted = settings.identity.trusted_headers
        if trusted is not None:
            names.update(trusted.names())
        if fwd.assertion is not None:
            names.add(fwd.assertion.header)
        if fwd.user_headers:
            names.update(_USER_HEADERS)
        if not fwd.pass_authorization:
            names.add("authorization")
        # Compared as the forwarder compares them: lower case, "_" read as "-".
        self.drop_headers = frozenset(n.lower().replace("_", "-") for n in names)
        cookie = settings.identity.cookie
        drop: set[str] = set()
        if cookie is not None and not fwd.pass_identity_cookie:
            drop.add(cookie)
        if settings.identity.session is not None:
            # The session is jitgate's alone: never the upstream's, whatever pass_* says.
            drop.add(settings.identity.session.cookie)
        self.drop_cookies = frozenset(drop)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        if self.reject_underscores:
            # Many servers (CGI, WSGI, PHP) read X_Forwarded_User as X-Forwarded-User, so a
            # name with "_" could smuggle an identity past a check made on "-" names. The
            # wire names (raw_headers) are checked, exactly as the client sent them.
            odd = next((k for k, _ in request.raw_headers if b"_" in k), None)
            if odd is not None:
                name = odd.decode("latin-1")[:64]
                reason = f"header name {name!r} has '_' (forward.reject_underscore_headers)"
                return self._bad_request(request, reason, started, "header")
        try:
            raw_path, query = split_target(request.raw_path)
            path = normalise(raw_path, reject_semicolons=self.settings.forward.reject_semicolons)
        except BadPath as exc:
            return self._bad_request(request, str(exc), started, "path")
        low = path.lower()
        if low == self.prefix.lower() or low.startswith(self.prefix.lower() + "/"):
            # The prefix belongs to jitgate: never forward it, however it was spelled.
            raise web.HTTPNotFound(text=f"jitgate: no such endpoint under {self.prefix}\n")

        session = self.sessions.lookup(request) if self.sessions is not None else None
        decision = await self.authorizer().decide(
            request.method, path, request.headers, request.cookies, request.remote, session
        )
        if decision.allow and decision.scope is not None and self.strict:
            decision = self._strict(decision)
        if not decision.allow:
            refusal = await self._refuse(request, decision, path)
            self._finish(request, decision, path, refusal.status, 0, None, started)
            return refusal

        outcome: Outcome | None = None
        # Under a grant, the response or WebSocket is cut when the grant ends.
        grant_id, stop, bar = decision.grant_id, None, None
        if grant_id is not None and decision.grant_expires_at is not None:
            stop = self.live.open(grant_id, decision.grant_expires_at)
            if self.status_bar is not None:
                # Only pages served under a grant: public and identity routes have no clock.
                bar = self.status_bar.for_request(
                    request.method, request.headers, decision.grant_expires_at
                )
        try:
            response, outcome = await self.forwarder.forward(
                request,
                path,
                query,
                drop_headers=self.drop_headers,
                drop_cookies=self.drop_cookies,
                set_headers=self._identity_headers(decision),
                stop=stop,
                rewrite=bar,
            )
            return response
        finally:
            if stop is not None and grant_id is not None:
                self.live.close(grant_id, stop)
            # Written even when the client went away mid-stream: status 499 then.
            status = outcome.status if outcome else 499
            sent = outcome.bytes_sent if outcome else 0
            error = outcome.upstream_error if outcome else "client disconnected"
            if error and outcome:
                self.metrics.upstream_errors.labels(error).inc()
            self._finish(request, decision, path, status, sent, error, started)

    def _finish(
        self,
        request: web.Request,
        decision: Decision,
        path: str,
        status: int,
        sent: int,
        upstream_error: str | None,
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        counter, histogram = self.metrics.request(decision.route, decision.outcome)
        counter.inc()
        histogram.observe(elapsed)
        reasons = list(decision.reasons)
        if upstream_error:
            reasons.append(f"upstream error: {upstream_error}")
        policy = self.authorizer().policy
        user = decision.identity.subject if decision.identity else None
        self.audit.emit(
            audit.record(
                "access.allow" if decision.allow else "access.deny",
                actor=user,  # who made the request: the subject, for an access
                user=user,
                scope=decision.scope,
                recording=policy.recording_of(decision.scope),
                grant_id=decision.grant_id,
                decision=decision.outcome,
                reasons=reasons,
                route=decision.route,
                method=request.method,
                path=path,
                status=status,
                bytes=sent,
                duration_ms=round(elapsed * 1000, 3),
                client_ip=request.remote,
                user_agent=request.headers.get("User-Agent"),
                policy_version=policy.version,
            )
        )

    def _strict(self, decision: Decision) -> Decision:
        """In strict audit mode, refuse a protected request whose record could not be kept."""
        if self.audit.writable():
            return decision
        reason = f"audit trail cannot be written ({self.audit.why_unwritable()}); strict mode"
        return replace(
            decision,
            allow=False,
            status=503,
            outcome="unavailable",
            reasons=(*decision.reasons, reason),
        )

    def _identity_headers(self, decision: Decision) -> dict[str, str] | None:
        """The identity jitgate vouches for upstream: its assertion, plain headers if asked."""
        ident = decision.identity
        if ident is None:
            return None
        out: dict[str, str] = {}
        if self.assertion is not None:
            out[self.assertion.header] = self.assertion.sign(ident)
        if self.user_headers:
            out["X-Forwarded-User"] = ident.subject
            if ident.email:
                out["X-Forwarded-Email"] = ident.email
            if ident.groups:
                out["X-Forwarded-Groups"] = ",".join(ident.groups)
        return out or None

    def _bad_request(
        self, request: web.Request, reason: str, started: float, what: str
    ) -> web.Response:
        counter, histogram = self.metrics.request("_invalid", "bad_request")
        counter.inc()
        histogram.observe(time.perf_counter() - started)
        self.audit.emit(
            audit.record(
                "access.deny",
                decision="bad_request",
                reasons=[reason],
                route="_invalid",
                method=request.method,
                path=request.raw_path[:2048],
                status=400,
                bytes=0,
                client_ip=request.remote,
                user_agent=request.headers.get("User-Agent"),
                policy_version=self.authorizer().policy.version,
            )
        )
        return web.Response(status=400, text=f"jitgate: bad request {what}: {reason}\n")

    def _to_provider(self, request: web.Request) -> bool:
        return (
            self.sso_login
            and request.method in ("GET", "HEAD")
            and wants_html(request)
            and "Authorization" not in request.headers
        )

    async def _refuse(self, request: web.Request, decision: Decision, path: str) -> web.Response:
        request_url, back = None, None
        if decision.scope and decision.status == 403 and decision.outcome == "deny":
            origin = request.url.origin()
            request_url = str(
                origin.with_path(f"{self.prefix}/request").with_query(scope=decision.scope)
            )
            if wants_html(request) and request.method in ("GET", "HEAD"):
                # The page's forms bring the browser back here once access is granted.
                back = safe_next(request.path_qs, self.prefix)
                request_url = str(URL(request_url).update_query(next=back))
        login_url = None
        if decision.status == 401:
            login_url = str(URL(f"{self.prefix}/login").with_query(next=request.path_qs))
            if self._to_provider(request):
                # Only a page the browser navigated to: a redirect would lose a POST's body,
                # and a script's fetch cannot follow it to another origin anyway.
                sso = URL(f"{self.prefix}/oidc/login").with_query(next=request.path_qs)
                return web.Response(
                    status=302, headers={"Location": str(sso), "Cache-Control": "no-store"}
                )
        error = {
            401: "unauthenticated",
            403: "blocked" if decision.outcome == "blocked" else "access_denied",
            503: "unavailable",
        }.get(decision.status, "refused")
        headers = {"Cache-Control": "no-store"}
        if decision.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="jitgate"'
        if wants_html(request):
            forms: list[dict[str, Any]] = []
            token = ""
            if back is not None and decision.identity is not None and decision.scope:
                scopes = [decision.scope, *decision.wider]
                forms, token = await requestpages.offer(request, scopes, back)
            headers["Content-Security-Policy"] = pages.CSP
            body = pages.render(
                request,
                "refused.html",
                prefix=self.prefix,
                **(nav(request, decision.identity, "") if decision.identity else {"user": None}),
                status=decision.status,
                heading=_HEADINGS.get(error, "Access refused"),
                kind="recording" if decision.scope and "/" in decision.scope else "resource",
                scope=decision.scope,
                wider=decision.wider,
                reasons=decision.reasons,
                request_url=request_url,
                forms=forms,
                csrf=token,
                next=back,
                login_url=login_url,
                method=request.method,
                path=path,
            )
            return web.Response(
                status=decision.status, text=body, content_type="text/html", headers=headers
            )
        payload: dict[str, Any] = {"error": error, "reasons": list(decision.reasons)}
        if decision.scope:
            payload["scope"] = decision.scope
        if request_url:
            payload["request_url"] = request_url
        return web.Response(
            status=decision.status,
            text=json.dumps(payload),
            content_type="application/json",
            headers=headers,
        )


_USER_HEADERS = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups")
_HEADINGS = {
    "unauthenticated": "Sign-in required",
    "access_denied": "Access needed",
    "blocked": "Blocked by policy",
    "unavailable": "Access check unavailable",
}
