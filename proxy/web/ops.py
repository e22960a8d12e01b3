"""Endpoints for operators: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .. import metrics
from ..state import State, app_state


async def healthz(request: web.Request) -> web.Response:
    """Answer while the process is alive."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Answer 200 only if Redis answers PING, the upstream accepts a connection and, in
    strict audit mode, audit records can be kept."""
    settings = app_state(request).settings
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(app_state(request).redis.ping(), settings.redis.timeout)
        checks["redis"] = "ok"
    except Exception as exc:
        app_state(request).metrics.redis_errors.labels("ping").inc()
        checks["redis"] = f"failed: {type(exc).__name__}"
    url = settings.upstream.url
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(url.host, port), settings.upstream.connect_timeout
        )
        writer.close()
        checks["upstream"] = "ok"
    except (OSError, TimeoutError) as exc:
        checks["upstream"] = f"failed: {type(exc).__name__}"
    audit_log = app_state(request).audit
    if settings.audit.strict:
        checks["audit"] = "ok" if audit_log.writable() else f"failed: {audit_log.why_unwritable()}"
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    """Expose the metrics, refreshing the gauges that are counted on demand."""
    m = app_state(request).metrics
    try:
        m.active_grants.set(await app_state(request).grants.count_active())
    except Exception:
        m.redis_errors.labels("count_active").inc()
    sample(app_state(request))
    return web.Response(body=m.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


def sample(state: State) -> None:
    """Set the gauges counted from this process's own state (each worker runs it every
    second under `serve --workers N`, so a scrape any worker answers sees them all)."""
    m, audit_log = state.metrics, state.audit
    for sink, (backlog, spooled) in audit_log.stats().items():
        m.audit_backlog.labels(sink).set(backlog)
        m.audit_spooled.labels(sink).set(spooled)
    m.audit_spool_bytes.set(audit_log.spool.bytes() if audit_log.spool else 0)
    m.audit_writable.set(1 if audit_log.writable() else 0)
    m.live_connections.set(len(state.live))


async def jwks_view(request: web.Request) -> web.Response:
    """Serve the public key the upstream verifies jitgate's identity assertions with."""
    signer = app_state(request).assertion
    if signer is None:
        raise web.HTTPNotFound(text="jitgate: forward.assertion is off: no keys to publish\n")
    # Short caching: a replaced key file shows up at the upstream within minutes.
    return web.json_response(
        signer.jwks(),
        content_type="application/jwk-set+json",
        headers={"Cache-Control": "public, max-age=300"},
    )
