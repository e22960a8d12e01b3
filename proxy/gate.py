"""The gate in front of every forwarded request: normalise, decide, forward, audit.

It renders no pages: a refusal is answered by the `refuse` callable app.py hands it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp import web

from . import audit
from .authorize import Decision
from .errors import BadPath
from .forward import Forwarder, Outcome
from .identity.assertion import AssertionSigner
from .live import LiveConnections
from .metrics import Metrics
from .paths import normalise, split_target
from .settings import ForwardSettings
from .settings.identity import IdentitySettings
from .state import State
from .statusbar import StatusBar

# Answers a refused request: a page for a browser, JSON for a script (web/refusal.py).
Refuse = Callable[[web.Request, Decision, str], Awaitable[web.Response]]


class Gate:
    """Catch-all handler: nothing reaches the upstream except through `handle`."""

    def __init__(
        self,
        prefix: str,
        forward: ForwardSettings,
        identity: IdentitySettings,
        *,
        strict_audit: bool,
        state: State,
        forwarder: Forwarder,
        audit_log: audit.AuditLog,
        metrics: Metrics,
        live: LiveConnections,
        refuse: Refuse,
        assertion: AssertionSigner | None = None,
    ) -> None:
        self.state = state
        self.forwarder = forwarder
        self.audit = audit_log
        self.metrics = metrics
        self.live = live
        self.refuse = refuse
        self.assertion = assertion
        self.prefix = prefix
        self.strict = strict_audit
        self.reject_underscores = forward.reject_underscore_headers
        self.reject_semicolons = forward.reject_semicolons
        self.user_headers = forward.user_headers
        self.status_bar = StatusBar(prefix) if forward.status_bar else None
        # Every header jitgate reads or sets for identity: a client's copy never goes up.
        names = set(forward.identity_headers)
        trusted = identity.trusted_headers
        if trusted is not None:
            names.update(trusted.names())
        if forward.assertion is not None:
            names.add(forward.assertion.header)
        if forward.user_headers:
            names.update(_USER_HEADERS)
        if not forward.pass_authorization:
            names.add("authorization")
        # Compared as the forwarder compares them: lower case, "_" read as "-".
        self.drop_headers = frozenset(n.lower().replace("_", "-") for n in names)
        cookie = identity.cookie
        drop: set[str] = set()
        if cookie is not None and not forward.pass_identity_cookie:
            drop.add(cookie)
        if identity.session is not None:
            # The session is jitgate's alone: never the upstream's, whatever pass_* says.
            drop.add(identity.session.cookie)
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
            path = normalise(raw_path, reject_semicolons=self.reject_semicolons)
        except BadPath as exc:
            return self._bad_request(request, str(exc), started, "path")
        low = path.lower()
        if low == self.prefix.lower() or low.startswith(self.prefix.lower() + "/"):
            # The prefix belongs to jitgate: never forward it, however it was spelled.
            raise web.HTTPNotFound(text=f"jitgate: no such endpoint under {self.prefix}\n")

        # The decision names its policy version: a reload while it streams changes nothing.
        decision = await self.state.config.authorizer.decide(
            request.method, path, lambda: self.state.identify(request)
        )
        if decision.allow and decision.scope is not None and self.strict:
            decision = self._strict(decision)
        if not decision.allow:
            refusal = await self.refuse(request, decision, path)
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
        user = decision.identity.subject if decision.identity else None
        self.audit.emit(
            audit.record(
                "access.allow" if decision.allow else "access.deny",
                actor=user,  # who made the request: the subject, for an access
                user=user,
                scope=decision.scope,
                recording=decision.recording,
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
                policy_version=decision.policy_version,
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
                policy_version=self.state.config.policy.version,
            )
        )
        return web.Response(status=400, text=f"jitgate: bad request {what}: {reason}\n")


_USER_HEADERS = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups")
