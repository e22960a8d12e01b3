"""Endpoints for operators: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import metrics
from .appkeys import AUDIT, GRANTS, LIVE, METRICS, REDIS, SETTINGS


async def healthz(request: web.Request) -> web.Response:
    """Answer while the process is alive."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Answer 200 only if Redis answers PING and the upstream accepts a connection."""
    settings = request.config_dict[SETTINGS]
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(request.config_dict[REDIS].ping(), settings.redis.timeout)
        checks["redis"] = "ok"
    except Exception as exc:
        request.config_dict[METRICS].redis_errors.labels("ping").inc()
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
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


async def metrics_view(request: web.Request) -> web.Response:
    """Expose the metrics, refreshing the gauges that are counted on demand."""
    m = request.config_dict[METRICS]
    try:
        m.active_grants.set(await request.config_dict[GRANTS].count_active())
    except Exception:
        m.redis_errors.labels("count_active").inc()
    m.audit_backlog.set(request.config_dict[AUDIT].backlog())
    m.live_connections.set(len(request.config_dict[LIVE]))
    return web.Response(body=m.render(), headers={"Content-Type": metrics.CONTENT_TYPE})
