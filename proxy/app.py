"""Wire the parts into one aiohttp application; no logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from . import audit, metrics, policy
from . import web as pages
from .appkeys import (
    ASSERTION,
    AUDIT,
    AUDIT_STORE,
    AUTHORIZER,
    GRANTS,
    LIVE,
    METRICS,
    NOTIFIER,
    OIDC,
    REDIS,
    SESSIONS,
    SETTINGS,
    WORKFLOW,
)  # fmt: skip
from .audit import sinks as auditsinks
from .audit.store import AuditStore, store_for
from .authorize import Authorizer
from .forward import Forwarder, UpstreamConfig
from .gate import Gate
from .grants import RedisGrants
from .identity import Verifier
from .identity.assertion import AssertionSigner
from .identity.oidc import OidcClient
from .identity.session import Sessions
from .live import LiveConnections, follow_revocations
from .notify import Notifier
from .redisd import EmbeddedRedis, connect_redis
from .reload import RELOADER, PolicyReloader
from .settings import Settings
from .web import api, auditpage, ops, signin, views
from .workflow import Workflow

log = logging.getLogger("jitgate")

GATE = web.AppKey("gate", Gate)


def audit_sinks(settings: Settings, redis: Redis | None) -> list[audit.Sink]:
    """Build the configured audit sinks."""
    a = settings.audit
    sinks: list[audit.Sink] = []
    store = store_for(settings, redis) if redis is not None else None
    if store is not None:
        sinks.append(store)
    if a.file is not None:
        f = a.file
        sinks.append(
            auditsinks.JsonlFileSink(
                f.path,
                rotate_bytes=f.rotate_bytes,
                rotate_daily=f.rotate_daily,
                retention=f.retention,
                fsync=f.fsync,
            )
        )
    if a.stdout:
        sinks.append(auditsinks.StdoutSink())
    for h in a.http:
        sinks.append(
            auditsinks.HttpSink(
                f"http:{h.name}",
                h.url,
                format=h.format,
                headers=h.headers,
                timeout=h.timeout,
                gzip=h.gzip,
            )
        )
    return sinks


def make_audit_log(settings: Settings, redis: Redis | None, m: metrics.Metrics) -> audit.AuditLog:
    a = settings.audit
    return audit.AuditLog(
        audit_sinks(settings, redis),
        batch_size=a.batch_size,
        flush_interval=a.flush_interval,
        queue_max=a.queue_max,
        on_written=lambda sink, n: m.audit_delivered.labels(sink).inc(n),
        on_failed=lambda sink, n: m.audit_failed.labels(sink).inc(n),
        on_dropped=lambda sink, n: m.audit_dropped.labels(sink).inc(n),
        hmac_key=a.hmac_key.reveal().encode() if a.hmac_key else None,
        key_id=a.key_id,
        checkpoint_every=a.checkpoint_every,
        checkpoint_interval=a.checkpoint_interval,
        spool_dir=a.spool_dir if a.spool else None,
        spool_max_bytes=a.spool_max_bytes,
        maintain_interval=a.maintain_interval,
    )


def build_app(settings: Settings, compiled: policy.Policy | None = None) -> web.Application:
    """Return the proxy application; Redis, upstream pool and audit start with it."""
    app = web.Application(client_max_size=0)
    app[SETTINGS] = settings
    app[METRICS] = metrics.Metrics()
    pages.setup(app)
    compiled = compiled or policy.load(settings.policy_file)
    app.cleanup_ctx.append(_lifecycle(compiled))

    # jitgate's own endpoints live in a sub-application under the prefix (its handlers
    # reach the shared state through request.config_dict). Routing checks that one
    # prefix, then the catch-all: everything else goes through the gate.
    own = web.Application()
    own.router.add_get("/healthz", ops.healthz)
    own.router.add_get("/readyz", ops.readyz)
    own.router.add_get("/metrics", ops.metrics_view)
    own.router.add_get("/.well-known/jwks.json", ops.jwks_view)
    own.router.add_get("/login", views.login_form)
    own.router.add_post("/login", views.login)
    own.router.add_get("/logout", signin.logout_form)
    own.router.add_post("/logout", signin.logout)
    oidc = settings.identity.oidc
    if oidc is not None:
        own.router.add_get("/oidc/login", signin.oidc_login)
        own.router.add_get(oidc.redirect_path.removeprefix(settings.prefix), signin.oidc_callback)
    own.router.add_static("/static", pages.STATIC_DIR)
    api.add_routes(own)
    pages.add_routes(own)
    auditpage.add_routes(own)
    own.router.add_route("*", "/{tail:.*}", _not_found)
    app.add_subapp(settings.prefix, own)
    app.router.add_route("*", "/{tail:.*}", _gate_handler)
    app.on_response_prepare.append(_save_session)
    return app


async def _save_session(request: web.Request, response: web.StreamResponse) -> None:
    sessions = request.config_dict.get(SESSIONS)
    if sessions is not None:
        await sessions.on_prepare(request, response)


async def start_verifier(settings: Settings, http: aiohttp.ClientSession) -> Verifier:
    """Return the identity verifier with every issuer's keys fetched, if they can be now.

    An issuer that cannot be reached does not stop jitgate: its tokens are refused until
    its keys load (each refused token may retry, within jwks_min_refetch_interval).
    """
    verifier = Verifier(settings.identity, session=http)
    for issuer, reason in (await verifier.warm_up()).items():
        log.warning("identity: keys of %s not loaded (%s); its tokens are refused", issuer, reason)
    return verifier


def _lifecycle(compiled: policy.Policy) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        m = app[METRICS]
        signer = None
        if settings.forward.assertion is not None:
            # Before anything starts: a bad key file stops jitgate here.
            signer = AssertionSigner.from_settings(settings.forward.assertion)
            app[ASSERTION] = signer
        # One session for discovery and JWKS fetches, apart from the upstream pool.
        http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        try:
            verifier = await start_verifier(settings, http)
        except BaseException:  # a bad key file: nothing else has started yet
            await http.close()
            raise
        embedded: EmbeddedRedis | None = None
        url = settings.redis.url
        if url is None:
            embedded = EmbeddedRedis(settings.state_dir)
            url = await embedded.start()
            log.info("embedded redis-server running on %s", url)
        redis = connect_redis(url, settings.redis.timeout, settings.redis.max_connections)
        app[REDIS] = redis
        grants = RedisGrants(redis, settings.redis.key_prefix)
        app[GRANTS] = grants
        sessions = oidc = None
        ident = settings.identity
        if ident.session is not None:
            sessions = Sessions(ident.session, redis=redis, key_prefix=settings.redis.key_prefix)
            app[SESSIONS] = sessions
        if ident.oidc is not None and sessions is not None:
            oidc = OidcClient(
                ident.oidc,
                sessions.fernet,
                session=http,
                prefix=settings.prefix,
                leeway=ident.leeway,
                max_token_bytes=ident.max_token_bytes,
                min_refetch_interval=ident.jwks_min_refetch_interval,
                max_age=ident.jwks_max_age,
            )
            error = await oidc.warm_up()
            if error is not None:
                # Not fatal, like any issuer: sign-in retries discovery when asked to.
                log.warning("identity.oidc: %s not reachable (%s)", ident.oidc.issuer, error)
            app[OIDC] = oidc
        audit_log = make_audit_log(settings, redis, m)
        await audit_log.start()
        app[AUDIT] = audit_log
        store = next((x.sink for x in audit_log.lanes if isinstance(x.sink, AuditStore)), None)
        if store is not None:
            app[AUDIT_STORE] = store
        up = settings.upstream
        forwarder = Forwarder(
            UpstreamConfig(
                up.url, up.host_header, up.connect_timeout, up.read_timeout, up.pool_size
            )
        )
        await forwarder.start()

        def grant_error(exc: BaseException) -> None:
            m.redis_errors.labels("grant_check").inc()
            log.warning("grant check failed: %r", exc)

        slot = [Authorizer(compiled, verifier, grants, grant_error)]
        app[AUTHORIZER] = slot
        live = LiveConnections(
            grants.expires_at, on_cut=lambda reason, n: m.live_cut.labels(reason).inc(n)
        )
        app[LIVE] = live
        follower = asyncio.create_task(
            follow_revocations(grants.revocations, live), name="revocation-feed"
        )
        notifier = None
        if settings.notifications.webhooks:
            notifier = Notifier(
                settings.notifications,
                prefix=settings.prefix,
                grants=grants,
                policy_version=lambda: slot[0].policy.version,
                metrics=m,
            )
            await notifier.start()
            app[NOTIFIER] = notifier
        app[WORKFLOW] = Workflow(
            lambda: slot[0].policy, grants, audit_log, settings.admins, notifier
        )
        app[GATE] = Gate(settings, lambda: slot[0], forwarder, audit_log, m, live, signer, sessions)
        sweeper = asyncio.create_task(
            _sweep_forever(app[WORKFLOW], settings.sweep_interval, m), name="grant-sweeper"
        )
        reloader = PolicyReloader(
            slot, settings.policy_file, m, audit_log, watch=settings.policy_watch
        )
        await reloader.start()
        app[RELOADER] = reloader
        try:
            yield
        finally:
            await reloader.stop()  # before the audit log closes: a reload writes to it
            for task in (follower, sweeper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await live.close_all()
            await forwarder.close()
            if notifier is not None:
                await notifier.close()  # before the audit log and Redis it may still read
            await audit_log.close()
            await redis.aclose()
            if embedded is not None:
                await embedded.stop()
            await verifier.close()
            if oidc is not None:
                await oidc.close()
            await http.close()

    return ctx


async def _sweep_forever(workflow: Workflow, interval: float, m: metrics.Metrics) -> None:
    """Write down expiries and lapses as they happen; Redis drops the keys by itself."""
    while True:
        await asyncio.sleep(interval)
        try:
            await workflow.sweep()
        except Exception as exc:  # Redis trouble: try again next time, nothing is lost
            m.redis_errors.labels("sweep").inc()
            log.warning("expiry sweep failed: %r", exc)


async def _not_found(request: web.Request) -> web.Response:
    prefix = request.config_dict[SETTINGS].prefix
    raise web.HTTPNotFound(text=f"jitgate: no such endpoint under {prefix}\n")


async def _gate_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[GATE].handle(request)


def run(settings: Settings) -> None:
    """Serve until interrupted."""
    app = build_app(settings)
    web.run_app(
        app,
        host=settings.listen.host,
        port=settings.listen.port,
        access_log=None,
        print=lambda *_: log.info(
            "jitgate listening on http://%s:%d -> %s",
            settings.listen.host,
            settings.listen.port,
            settings.upstream.url,
        ),
    )
