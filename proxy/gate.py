"""The gate in front of every forwarded request: normalise, decide, forward, audit.

It renders no pages: a refusal is answered by the `refuse` callable app.py hands it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import audit
from .accesslog import AccessLog, underscore_header
from .authorize import Authorizer, Decision
from .blobs import BlobSigner
from .bodyrules import BadBody, BodyTooLarge
from .errors import BadPath
from .forward import Forwarder, Outcome
from .identity.assertion import AssertionSigner
from .listener import over_limits, refuse_over_limits
from .lists import LIST_DROP_HEADERS, LIST_REQUEST_HEADERS, ListRewrite
from .listsensitivity import Lookups
from .live import LiveConnections
from .metrics import Metrics
from .paths import normalise, split_target
from .rewrites import Rewrites
from .settings import ForwardSettings, ListenSettings
from .settings.identity import IdentitySettings
from .state import State
from .statusbar import StatusBar
from .vouch import Vouch

log = logging.getLogger("jitgate.upstream")

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
        blob_signer: BlobSigner | None = None,
        listen: ListenSettings | None = None,
    ) -> None:
        self.state = state
        self.forwarder = forwarder
        self.audit = audit_log
        self.metrics = metrics
        self.live = live
        self.refuse = refuse
        self.assertion = assertion
        self.blob_signer = blob_signer  # rewrites presigned URLs (blobs.py)
        self.prefix = prefix
        self.strict = strict_audit
        self.reject_underscores = forward.reject_underscore_headers
        self.reject_semicolons = forward.reject_semicolons
        self.status_bar = StatusBar(prefix) if forward.status_bar else None
        self.vouch = Vouch(forward, identity, assertion)
        self.hygiene = self.vouch.hygiene  # holds vouch.drop_headers too
        self.drop_cookies = self.vouch.drop_cookies
        self.log = AccessLog(audit_log, metrics.request, state)
        self.max_body = forward.max_body_bytes
        self.listen = listen  # its limits answer 414 and 431 (listener.py)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        # Behind a proxy in forward.trusted_proxies, the client it names; else the peer.
        client_ip = self.hygiene.client_ip(request)
        if self.listen is not None and (over := over_limits(request, self.listen)):
            self.log.refused(request, over[1], started, status=over[0], client_ip=client_ip)
            return refuse_over_limits(request, *over)
        if self.reject_underscores:
            reason = underscore_header(request)
            if reason is not None:
                return self._bad_request(request, reason, started, "header")
        if not self.hygiene.host_allowed(request):
            host = request.headers.get("Host", "")[:64]
            reason = f"Host {host!r} is not in forward.allowed_hosts"
            return self._bad_request(request, reason, started, "host")
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
        held: list[bytes] = []  # the body, when a body rule read it: forwarded as read

        async def read_body() -> bytes:
            held.append(await hold_body(request, self.max_body))
            return held[0]

        authorizer = self.state.config.authorizer
        decision = await authorizer.decide(
            request.method, path, lambda: self.state.identify(request), query, read_body
        )
        if decision.allow and decision.scope is not None and self.strict:
            decision = self.log.strict(decision)
        if not decision.allow:
            refusal = await self.refuse(request, decision, path)
            self.log.decision(
                request, decision, path, refusal.status, 0, None, started, client_ip=client_ip
            )
            return refusal

        outcome: Outcome | None = None
        # Under a grant, the response or WebSocket is cut when the grant ends.
        grant_id, stop, bar = decision.grant_id, None, None
        if grant_id is not None and self.state.metadata is not None:
            self.state.metadata.prefetch(decision.scope)  # whose recording: while it streams
        if grant_id is not None and decision.grant_expires_at is not None:
            stop = self.live.open(grant_id, decision.grant_expires_at)
            if self.status_bar is not None:
                # Only pages served under a grant: public and identity routes have no clock.
                bar = self.status_bar.for_request(
                    request.method, request.headers, decision.grant_expires_at
                )
        set_headers, listed = self.vouch.headers(decision), None
        # A protected route's presigned URLs (blobs.py), and a list or references to check
        # (lists.py, refs.py): each asks for whole, uncompressed JSON.
        blobs = self.blob_signer.rewrite(decision) if self.blob_signer is not None else None
        if decision.identity is not None and request.method in ("GET", "POST"):
            user, body = decision.identity.subject, held[0] if held else None
            listed = self._listed(authorizer, request.method, path, query, body, user)
        json_rewrites = [r for r in (listed, blobs) if r is not None]
        if json_rewrites:
            set_headers = {**(set_headers or {}), **LIST_REQUEST_HEADERS}
        # The decision is spooled before anything goes upstream or back to the client; how
        # the response ended follows in a completion record (audit/pairs.py).
        decided = self.log.decided(request, decision, path, client_ip=client_ip)
        try:
            response, outcome = await self.forwarder.forward(
                request,
                path,
                query,
                drop_headers=LIST_DROP_HEADERS if json_rewrites else frozenset(),
                drop_cookies=self.drop_cookies,
                set_headers=set_headers,
                stop=stop,
                rewrite=Rewrites.of(bar, listed, blobs),
                hygiene=self.hygiene,
                body=held[0] if held else None,
            )
            return response
        finally:
            if stop is not None and grant_id is not None:
                self.live.close(grant_id, stop)
            notes = tuple(r.note for r in json_rewrites if r.note is not None)
            # Written even when the client went away mid-stream: status 499 then.
            status = outcome.status if outcome else 499
            sent = outcome.bytes_sent if outcome else 0
            error = outcome.upstream_error if outcome else "client disconnected"
            if error and outcome:
                self.metrics.upstream_errors.labels(error).inc()
                detail = (outcome.detail or error).removeprefix("jitgate: ")
                done = f"cut after {sent} bytes" if outcome.cut else f"answered {status}"
                log.warning("%s %s %s: %s", request.method, path, done, detail)
            cancelled = False
            try:
                subject = await self.log.subject(decision)
            except asyncio.CancelledError:  # the record is written all the same
                subject, cancelled = {"subject_error": "request cancelled before metadata"}, True
            self.log.completed(
                request, decision, decided, path, (status, sent, error), started, notes, subject
            )
            if cancelled:
                raise asyncio.CancelledError

    def _listed(
        self,
        authorizer: Authorizer,
        method: str,
        path: str,
        query: str,
        body: bytes | None,
        user: str,
    ) -> ListRewrite | None:
        """The rewrite of a response with a list (`lists:`) or references (`refs:`) to check."""
        policy = authorizer.policy
        match = policy.match(method, path, query)  # the decision's own, from the same policy
        if match.body and body is not None:
            match = policy.match_body(match, body)  # decided on the body: its route
        listing = match.listing if policy.lists != "pass" else None
        if listing is None and not match.refs:
            return None
        lists, refs = self.metrics.lists, self.metrics.refs

        def count(outcome: str) -> None:
            lists.labels(match.route, outcome).inc()

        def count_refs(outcome: str) -> None:
            refs.labels(match.route, outcome).inc()

        return ListRewrite(
            policy.lists,
            listing,
            dict(match.params),
            policy,
            authorizer.grants,
            user,
            self.prefix,
            count,
            match.route,
            match.refs,
            count_refs,
            self._lookups() if policy.sensitivity else None,
        )

    def _lookups(self) -> Lookups | None:
        """What a list's rewrite reads for the sensitivity rules (None: no metadata)."""
        cache, grants = self.state.metadata, self.state.grants
        if cache is None:
            return None

        async def metadata(scopes: list[str]) -> dict[str, dict[str, Any] | None]:
            found = await cache.cached(scopes)
            return {s: m.to_json() if m is not None else None for s, m in found.items()}

        return Lookups(metadata, grants.entitlements)

    def _bad_request(
        self, request: web.Request, reason: str, started: float, what: str
    ) -> web.Response:
        self.log.refused(request, reason, started, client_ip=self.hygiene.client_ip(request))
        return web.Response(status=400, text=f"jitgate: bad request {what}: {reason}\n")


async def hold_body(request: web.Request, limit: int) -> bytes:
    """Read a request body whole for a body rule; over `limit` bytes, or encoded, refuse."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise BadBody(f"a body rule cannot read a {coding!r}-encoded body")
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"{length} bytes is over forward.max_body_bytes ({limit})")
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"over forward.max_body_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)
