"""Serve `{prefix}/blob/{token}`: a recording file fetched from storage, under a live grant.

A blob URL (blobs.py) opens only when all of these hold, checked in this order on every
fetch: the token was sealed by jitgate and is unaltered (else 403), it has not expired
(403), the caller is identified (401) as the user it was issued to (403), its storage
origin is still in `blobs.origins` (403), and that user holds an active grant covering its
scope, asked of Redis itself, not of the local grant view (403; 503 when Redis cannot
answer). So a URL copied before a revocation fails after it.

The file is then fetched from the storage URL as it was given (redirects not followed)
and streamed to the client; the client's Range and conditional headers go with it,
nothing else. The stream is cut when the grant is revoked or expires. Each fetch, allowed
or refused, is one `access.allow` / `access.deny` audit record on route `_blob` and is
counted in `jitgate_blob_fetches{outcome}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from yarl import URL

from . import audit
from .accesslog import AccessLog
from .authorize import Decision
from .blobs import BadTicket, BlobSigner, Ticket
from .identity import Identity
from .policy import Access
from .settings.blobs import BlobSettings, origin_of
from .state import State

log = logging.getLogger("jitgate.blobfetch")

ROUTE = "_blob"
_PASS_REQUEST = ("Range", "If-Range", "If-None-Match", "If-Modified-Since", "Accept-Encoding")
_PASS_RESPONSE = (
    "Content-Type", "Content-Length", "Content-Encoding", "Content-Range", "Accept-Ranges",
    "ETag", "Last-Modified", "Content-Disposition",
)  # fmt: skip


@dataclass
class Sent:
    """How far one fetch got, for its audit record: kept up to date while it streams."""

    status: int = 499  # the client went away before a status was sent
    bytes: int = 0
    error: str | None = "client disconnected"

    def finish(self, status: int, size: int, error: str | None) -> None:
        self.status, self.bytes, self.error = status, size, error


class BlobFetcher:
    """The `{prefix}/blob/{token}` handler, with its own client session to storage."""

    def __init__(
        self, state: State, signer: BlobSigner, settings: BlobSettings, audit_log: audit.AuditLog
    ) -> None:
        self.state = state
        self.signer = signer
        self.settings = settings
        self.connect = dict(settings.connect)
        self.path = signer.base.rstrip("/")  # what the audit record names: never the token
        self.log = AccessLog(audit_log, state.metrics.request, state)
        self.counter = state.metrics.blob_fetches
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            ),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        asking = await self.state.identify(request)  # the audit names who tried
        caller = asking.identity
        try:
            ticket = await self.signer.open(request.match_info["token"])
        except BadTicket as exc:
            return self._refuse(request, started, 403, exc.kind, str(exc), None, caller)
        except Exception as exc:  # the key cannot be read: Redis is down
            why = f"blob key unavailable ({type(exc).__name__}); failing closed"
            return self._refuse(request, started, 503, "unavailable", why, None, caller)
        if caller is None:
            why = f"sign in to open this recording file ({asking.reason})"
            return self._refuse(
                request, started, 401, "unauthenticated", why, ticket, None, code=asking.code
            )
        who = caller
        if who.subject != ticket.user:
            why = "this blob URL was issued to another user"
            return self._refuse(request, started, 403, "other_user", why, ticket, who)
        if origin_of(ticket.url) not in self.settings.origins:
            why = "the blob's storage origin is no longer in blobs.origins"
            return self._refuse(request, started, 403, "origin", why, ticket, who)
        scopes = self.state.config.policy.covering(ticket.scope)
        try:
            held = await self.state.grants.check(ticket.user, scopes)
        except Exception as exc:  # fail closed on any grant-store trouble
            self.state.metrics.redis_errors.labels("grant_check").inc()
            why = f"grant store unavailable ({type(exc).__name__}); failing closed"
            return self._refuse(request, started, 503, "unavailable", why, ticket, who)
        if held is None:
            why = f"no active grant for {ticket.scope} (or a scope covering it)"
            return self._refuse(request, started, 403, "deny", why, ticket, who)
        grant_id, expires_at = held
        why = f"active grant {grant_id} covers {ticket.scope}"
        decision = replace(self._decision(True, 0, "allow", why, ticket, who), grant_id=grant_id)
        sent = Sent()
        # In the spool before a byte is sent; how the fetch ended follows (audit/pairs.py).
        decided = self.log.decided(request, decision, self.path, client_ip=None)
        try:
            return await self._relay(request, ticket, grant_id, expires_at, sent)
        finally:  # written even when the client went away mid-stream (499 then)
            self.counter.labels("allow" if sent.error is None else "storage_error").inc()
            outcome = (sent.status, sent.bytes, sent.error)
            self.log.completed(request, decision, decided, self.path, outcome, started)

    async def _relay(
        self, request: web.Request, ticket: Ticket, grant_id: str, expires_at: float, sent: Sent
    ) -> web.StreamResponse:
        """Fetch the file and stream it on; `sent` says how far it got."""
        assert self._session is not None, "BlobFetcher.start() was not awaited"
        headers = {k: request.headers[k] for k in _PASS_REQUEST if k in request.headers}
        url = URL(ticket.url, encoded=True)  # as signed: never re-encoded
        address = self.connect.get(origin_of(ticket.url) or "")
        if address is not None:  # reached elsewhere, with the Host the URL was signed for
            headers["Host"] = url.raw_authority
            url = URL(address + url.raw_path_qs, encoded=True)
        live = self.state.live
        stop = live.open(grant_id, expires_at)
        # Revoked or expired mid-stream: cut at once, even while storage is silent.
        upstream: list[aiohttp.ClientResponse] = []
        watcher = asyncio.create_task(_cut_on(stop, request, upstream, sent))
        out: web.StreamResponse | None = None
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as up:
                upstream.append(up)
                if 300 <= up.status < 400 and up.status != 304:
                    text = f"jitgate: storage answered {up.status} (redirects are not followed)\n"
                    sent.finish(502, len(text), "storage_redirect")
                    return web.Response(status=502, text=text)
                out = web.StreamResponse(status=up.status)
                for name in _PASS_RESPONSE:
                    if name in up.headers:
                        out.headers[name] = up.headers[name]
                out.headers["Cache-Control"] = "private, no-store"
                out.headers["X-Content-Type-Options"] = "nosniff"
                sent.status = up.status
                await out.prepare(request)
                async for chunk in up.content.iter_any():
                    if stop.is_set():
                        break
                    await out.write(chunk)
                    sent.bytes += len(chunk)
                if stop.is_set():
                    _abort(request)
                    return out
                await out.write_eof()
                sent.error = None
                return out
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if not stop.is_set():
                sent.error = "storage"
            if out is not None and out.prepared:  # the status line is gone: cut
                _abort(request)
                return out
            text = f"jitgate: storage fetch failed ({type(exc).__name__})\n"
            sent.finish(502, len(text), sent.error)
            return web.Response(status=502, text=text)
        finally:
            watcher.cancel()
            live.close(grant_id, stop)

    def _decision(
        self,
        allow: bool,
        status: int,
        outcome: str,
        reason: str,
        ticket: Ticket | None,
        who: Identity | None,
        code: str | None = None,
    ) -> Decision:
        policy = self.state.config.policy
        scope = ticket.scope if ticket is not None else None
        reasons = (reason,) if ticket is None else (reason, f"blob URL from route {ticket.route}")
        return Decision(
            allow,
            status,
            outcome,
            reasons,
            ROUTE,
            Access.PROTECTED,
            scope=scope,
            grant_id=ticket.grant_id if ticket is not None else None,
            identity=who,
            policy_version=policy.version,
            recording=policy.recording_of(scope),
            reason_code=code,
        )

    def _refuse(
        self,
        request: web.Request,
        started: float,
        status: int,
        kind: str,
        why: str,
        ticket: Ticket | None,
        who: Identity | None,
        *,
        code: str | None = None,
    ) -> web.Response:
        self.counter.labels(kind).inc()
        outcome = {401: "unauthenticated", 503: "unavailable"}.get(status, "deny")
        decision = self._decision(False, status, outcome, why, ticket, who, code)
        text = f"jitgate: {why}\n"
        self.log.decision(request, decision, self.path, status, 0, None, started)
        return web.Response(status=status, text=text, headers={"Cache-Control": "no-store"})


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def _cut_on(
    stop: asyncio.Event, request: web.Request, upstream: list[aiohttp.ClientResponse], sent: Sent
) -> None:
    await stop.wait()
    sent.error = "grant ended"
    _abort(request)
    for response in upstream:  # a storage that is silent is not waited for
        response.close()
