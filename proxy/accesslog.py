"""The record of each access decision: one audit record and the request metrics.

Shared by the gate (proxy mode) and forward-auth, so that both write the same records;
a forward-auth record also carries `mode: forward_auth` and says what jitgate answered
the proxy, since the response itself never passes through jitgate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Histogram

from . import audit
from .audit.pairs import DONE
from .audit.subjects import form_for
from .authorize import Decision
from .state import State

# Returns the bound (counter, histogram) children for one route and decision.
Meter = Callable[[str, str], tuple[Counter, Histogram]]


class AccessLog:
    def __init__(
        self, audit_log: audit.AuditLog, meter: Meter, state: State, mode: str | None = None
    ) -> None:
        self.audit = audit_log
        self.meter = meter
        self.state = state
        self.mode = mode  # None in proxy mode: its records carry no `mode`
        self.subject_form = form_for(state.settings)

    def decision(
        self,
        request: web.Request,
        decision: Decision,
        path: str,
        status: int,
        sent: int,
        upstream_error: str | None,
        started: float,
        *,
        method: str | None = None,
        client_ip: str | None = None,
        subject: Mapping[str, str] | None = None,
    ) -> None:
        """Count and audit one decided request in one record, written before its answer
        is sent (a refusal, a forward-auth answer); `method`, `client_ip`: if not the
        request's. `subject`: whose recording it is (`subject`), or why that is not known
        (`subject_error`), for an access under a grant when recording metadata is on."""
        elapsed = self._count(decision, started)
        reasons = list(decision.reasons)
        if upstream_error:
            reasons.append(f"upstream error: {upstream_error}")
        self.audit.emit(
            self._record(
                request, decision, path, reasons, method, client_ip,
                status=status, bytes=sent, duration_ms=round(elapsed * 1000, 3),
                **(subject or {}),
            )
        )  # fmt: skip

    def decided(
        self, request: web.Request, decision: Decision, path: str, *, client_ip: str | None
    ) -> str:
        """Audit an allowed request before it is forwarded; return its record's id.

        The record is in the spool (written to the kernel) when this returns, so a crash
        after the first response byte cannot lose it (audit/pairs.py)."""
        rec = self._record(request, decision, path, list(decision.reasons), None, client_ip)
        self.audit.emit(rec)
        return str(rec["id"])

    def completed(
        self,
        request: web.Request,
        decision: Decision,
        decided_id: str,
        path: str,
        outcome: tuple[int, int, str | None],
        started: float,
        notes: tuple[str, ...] = (),
        subject: Mapping[str, str] | None = None,
    ) -> None:
        """Count a forwarded request and audit how it ended: `access.done` for its decision,
        with whose recording it was (`subject`, as in `decision`)."""
        status, sent, upstream_error = outcome
        elapsed = self._count(decision, started)
        reasons = list(notes)
        if upstream_error:
            reasons.append(f"upstream error: {upstream_error}")
        user = decision.identity.subject if decision.identity else None
        self.audit.emit(
            audit.record(
                DONE, decision_id=decided_id, user=user, scope=decision.scope,
                recording=decision.recording, grant_id=decision.grant_id, route=decision.route,
                method=request.method, path=path, status=status, bytes=sent,
                duration_ms=round(elapsed * 1000, 3), reasons=reasons or None, mode=self.mode,
                **(subject or {}),
            )
        )  # fmt: skip

    def _count(self, decision: Decision, started: float) -> float:
        elapsed = time.perf_counter() - started
        counter, histogram = self.meter(decision.route, decision.outcome)
        counter.inc()
        histogram.observe(elapsed)
        return elapsed

    def _record(
        self,
        request: web.Request,
        decision: Decision,
        path: str,
        reasons: list[str],
        method: str | None,
        client_ip: str | None,
        **outcome: Any,
    ) -> audit.Record:
        user = decision.identity.subject if decision.identity else None
        return audit.record(
            "access.allow" if decision.allow else "access.deny",
            actor=user,  # who made the request: the subject, for an access
            user=user,
            scope=decision.scope,
            recording=decision.recording,
            grant_id=decision.grant_id,
            decision=decision.outcome,
            reasons=reasons,
            reason_code=decision.reason_code,
            route=decision.route,
            method=method or request.method,
            path=path,
            **outcome,
            client_ip=client_ip or request.remote,
            user_agent=request.headers.get("User-Agent"),
            policy_version=decision.policy_version,
            mode=self.mode,
        )

    async def subject(self, decision: Decision) -> dict[str, str] | None:
        """Whose recording an access under a grant was to (audit/subjects.py), or why unknown.

        Waits at most `metadata.wait` for a fetch under way (started at grant time, or by
        the gate before forwarding).
        """
        cache, form, scope = self.state.metadata, self.subject_form, decision.scope
        if cache is None or form is None or decision.grant_id is None or not cache.applies(scope):
            return None
        assert scope is not None
        meta = self.state.settings.metadata
        wait = meta.wait if meta is not None else 0.0
        try:
            found, why = await cache.lookup(scope, wait)
        except Exception as exc:  # never lose the record over its subject
            found, why = None, f"metadata lookup failed: {exc!r}"
        if found is None:
            return {"subject_error": why or "metadata unknown"}
        if found.subject is None:
            return {"subject_error": f"the recording's metadata names no {cache.subject_field}"}
        return {"subject": form(found.subject)}

    def refused(
        self,
        request: web.Request,
        reason: str,
        started: float,
        *,
        status: int = 400,
        outcome: str = "bad_request",
        route: str = "_invalid",
        method: str | None = None,
        path: str | None = None,
        client_ip: str | None = None,
    ) -> None:
        """Count and audit a request refused before any policy decision (a bad request)."""
        counter, histogram = self.meter(route, outcome)
        counter.inc()
        histogram.observe(time.perf_counter() - started)
        self.audit.emit(
            audit.record(
                "access.deny",
                decision=outcome,
                reasons=[reason],
                route=route,
                method=method or request.method,
                path=(path if path is not None else request.raw_path)[:2048],
                status=status,
                bytes=0,
                client_ip=client_ip or request.remote,
                user_agent=request.headers.get("User-Agent"),
                policy_version=self.state.config.policy.version,
                mode=self.mode,
            )
        )

    def strict(self, decision: Decision) -> Decision:
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


def underscore_header(request: web.Request) -> str | None:
    """The reason to refuse a request with '_' in a header name, or None.

    Many servers (CGI, WSGI, PHP) read X_Forwarded_User as X-Forwarded-User, so a name
    with "_" could smuggle an identity past a check made on "-" names. The wire names
    (raw_headers) are checked, exactly as the client sent them.
    """
    odd = next((k for k, _ in request.raw_headers if b"_" in k), None)
    if odd is None:
        return None
    name = odd.decode("latin-1")[:64]
    return f"header name {name!r} has '_' (forward.reject_underscore_headers)"
