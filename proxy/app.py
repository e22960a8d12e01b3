"""Wire the parts into one aiohttp application; no logic of its own.

Each resource starts and stops in a cleanup context of its own, in the order `_resources`
gives: started first to last, stopped last to first (so the audit log closes after
everything that writes to it, and Redis after the audit log).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from . import audit, metrics, policy, policyfile
from . import web as pages
from .audit import sinks as auditsinks
from .audit.store import AuditStore, store_for
from .authorize import Authorizer
from .authz import ForwardAuth
from .blobfetch import BlobFetcher
from .blobs import BlobKeys, BlobSigner
from .breaker import Breaker, BreakerOpen
from .forward import Forwarder, UpstreamConfig
from .gate import Gate
from .grantstore import RedisGrants
from .grantview import GrantView
from .identity import Verifier
from .identity.assertion import AssertionSigner
from .identity.oidc import OidcClient
from .identity.session import Sessions
from .listener import limits_middleware, quiet_bad_requests
from .live import LiveConnections, follow_revocations
from .metadata import MetadataCache, adapter_for
from .notify import Notifier
from .redisd import EmbeddedRedis, connect_redis
from .reload import PolicyReloader
from .sensitivity import Rule, matching
from .settings import Settings
from .state import STATE, Config, State, app_state
from .web import api, auditpage, ops, refusal, signin, views
from .workflow import Workflow

log = logging.getLogger("jitgate")

GATE = web.AppKey("gate", Gate)
BLOBS = web.AppKey("blobs", BlobFetcher)
AUTHZ = web.AppKey("authz", ForwardAuth)
Ctx = Callable[[web.Application], AsyncIterator[None]]


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
    quiet_bad_requests()
    state = State(settings, metrics.Metrics())
    app[STATE] = state
    pages.setup(app)
    compiled = compiled or policyfile.load(settings.policy_file)
    app.cleanup_ctx.extend(ctx(state) for ctx in _resources(compiled))

    # jitgate's own endpoints live in a sub-application under the prefix (its handlers
    # reach the shared state through request.config_dict). Routing checks that one
    # prefix, then the catch-all: everything else goes through the gate.
    own = web.Application(middlewares=[limits_middleware(settings.listen)])
    own.router.add_get("/healthz", ops.healthz)
    own.router.add_get("/readyz", ops.readyz)
    own.router.add_get("/metrics", ops.metrics_view)
    own.router.add_get("/.well-known/jwks.json", ops.jwks_view)
    own.router.add_get("/blob/{token}", _blob_handler, allow_head=False)
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
    if settings.forward_auth.enabled:
        # Forward-auth: the original target in headers (nginx, Traefik) or after /authz (Envoy).
        own.router.add_route("*", "/authz", _authz_handler)
        own.router.add_route("*", "/authz/{tail:.*}", _authz_handler)
    own.router.add_route("*", "/{tail:.*}", _not_found)
    app.add_subapp(settings.prefix, own)
    app.router.add_route("*", "/{tail:.*}", _gate_handler)
    app.on_response_prepare.append(_save_session)
    return app


async def _save_session(request: web.Request, response: web.StreamResponse) -> None:
    sessions = app_state(request).sessions
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


def _resources(compiled: policy.Policy) -> list[Callable[[State], Ctx]]:
    """The cleanup contexts, in start order; `compiled` is the policy to start with."""

    def config(state: State) -> Ctx:
        async def ctx(app: web.Application) -> AsyncIterator[None]:
            settings, m = state.settings, state.metrics
            # One session for discovery and JWKS fetches, apart from the upstream pool.
            state.http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            try:
                verifier = await start_verifier(settings, state.http)
            except BaseException:  # a bad key file
                await state.http.close()
                raise

            def grant_error(exc: BaseException) -> None:
                m.redis_errors.labels("grant_check").inc()
                if not isinstance(exc, BreakerOpen):  # said once, when the breaker opened
                    log.warning("grant check failed: %r", exc)

            view = state.grant_view
            checker = view if view is not None else state.breaker
            sensitivity = m.sensitivity_refusals
            authorizer = Authorizer(
                compiled,
                checker,
                grant_error,
                metadata=(lambda scope: _metadata_of(state, scope)) if settings.metadata else None,
                on_sensitivity=lambda outcome: sensitivity.labels(outcome).inc(),
                grant_entitlement=lambda grant_id: _entitlement_of(state, grant_id),
            )
            state.config = Config(settings, authorizer, verifier)
            try:
                yield
            finally:
                await verifier.close()
                await state.http.close()

        return ctx

    return [
        _assertion, _redis, config, _sessions, _audit, _live, _notifier, _metadata, _workflow,
        _reloader,
    ]  # fmt: skip


def _assertion(state: State) -> Ctx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        assertion = state.settings.forward.assertion
        if assertion is not None:
            # Before anything starts: a bad key file stops jitgate here.
            state.assertion = AssertionSigner.from_settings(assertion)
        yield

    return ctx


def _redis(state: State) -> Ctx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = state.settings
        embedded: EmbeddedRedis | None = None
        url = None
        if settings.redis.embedded:
            embedded = EmbeddedRedis(settings.state_dir)
            url = await embedded.start()
            log.info("embedded redis-server running on %s", url)
        state.redis = connect_redis(settings.redis, url)
        wait = (settings.redis.wait_replicas, settings.redis.wait_timeout)
        state.grants = RedisGrants(state.redis, settings.redis.key_prefix, wait=wait)
        breaker = state.breaker = _breaker(state)
        watch = asyncio.create_task(breaker.run(), name="redis-breaker")
        follower = None
        if settings.redis.local_view:
            view = state.grant_view = GrantView(breaker, lag=settings.redis.view_lag)
            state.metrics.watch_grant_view(
                lambda: (view.hits, view.misses, view.current(), len(view))
            )
            follower = asyncio.create_task(view.follow(state.grants.events), name="grant-view")
        try:
            yield
        finally:
            if follower is not None:
                await _cancel(follower)
            await _cancel(watch)
            await state.redis.aclose()
            if embedded is not None:
                await embedded.stop()

    return ctx


def _breaker(state: State) -> Breaker:
    r, m = state.settings.redis, state.metrics

    def changed(is_open: bool) -> None:
        m.redis_breaker_open.set(int(is_open))
        if is_open:
            m.redis_breaker_trips.inc()

    return Breaker(
        state.grants,
        state.redis.ping,
        trip_after=r.breaker_trip_after,
        probe_every=r.breaker_probe_every,
        probe_timeout=r.timeout,
        on_change=changed,
    )


def _sessions(state: State) -> Ctx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        ident, prefix = state.settings.identity, state.settings.redis.key_prefix
        if ident.session is not None:
            state.sessions = Sessions(ident.session, redis=state.redis, key_prefix=prefix)
        if ident.oidc is None or state.sessions is None:
            yield
            return
        oidc = OidcClient(
            ident.oidc,
            state.sessions.fernet,
            session=state.http,
            prefix=state.settings.prefix,
            leeway=ident.leeway,
            max_token_bytes=ident.max_token_bytes,
            min_refetch_interval=ident.jwks_min_refetch_interval,
            max_age=ident.jwks_max_age,
        )
        error = await oidc.warm_up()
        if error is not None:
            # Not fatal, like any issuer: sign-in retries discovery when asked to.
            log.warning("identity.oidc: %s not reachable (%s)", ident.oidc.issuer, error)
        state.oidc = oidc
        try:
            yield
        finally:
            await oidc.close()

    return ctx


def _audit(state: State) -> Ctx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        audit_log = make_audit_log(state.settings, state.redis, state.metrics)
        await audit_log.start()
        state.audit = audit_log
        stores = (x.sink for x in audit_log.lanes if isinstance(x.sink, AuditStore))
        state.audit_store = next(stores, None)
        try:
            yield
        finally:
            await audit_log.close()  # after everything that writes to it has stopped

    return ctx


def _live(state: State) -> Ctx:
    """Live responses and WebSockets under grants, cut when the revocation feed says so."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        m, grants = state.metrics, state.grants
        state.live = LiveConnections(
            grants.expires_at, on_cut=lambda reason, n: m.live_cut.labels(reason).inc(n)
        )
        follower = asyncio.create_task(
            follow_revocations(grants.revocations, state.live), name="revocation-feed"
        )
        try:
            yield
        finally:
            await _cancel(follower)
            await state.live.close_all()

    return ctx


def _notifier(state: State) -> Ctx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = state.settings
        if not settings.notifications.webhooks:
            yield
            return
        notifier = Notifier(
            settings.notifications,
            prefix=settings.prefix,
            grants=state.grants,
            policy_version=lambda: state.config.policy.version,
            metrics=state.metrics,
        )
        await notifier.start()
        state.notifier = notifier
        try:
            yield
        finally:
            await notifier.close()  # before the audit log and Redis it may still read

    return ctx


def _metadata(state: State) -> Ctx:
    """Recording metadata from the replay tool's API (proxy/metadata/), with a metadata section."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = state.settings
        meta = settings.metadata
        if meta is None:
            yield
            return
        lookups = state.metrics.metadata_lookups
        state.metadata = cache = MetadataCache(
            adapter_for(meta),
            state.redis,
            state.http,
            meta.url or settings.upstream.url,
            key_prefix=settings.redis.key_prefix,
            ttl=meta.ttl,
            timeout=meta.timeout,
            counted=lambda source: lookups.labels(source).inc(),
        )
        try:
            yield
        finally:
            await cache.close()

    return ctx


def _workflow(state: State) -> Ctx:
    """The workflow with its expiry sweep, and the gate with its upstream pool."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = state.settings
        events = state.metrics.grant_events
        state.workflow = Workflow(
            lambda: state.config.policy,
            state.grants,
            state.audit,
            settings.admins,
            state.notifier,
            counted=lambda event: events.labels(event).inc(),
            granted=lambda grant: _prefetch(state, grant.scope),
            sensitive=(lambda scope: _sensitive(state, scope)) if settings.metadata else None,
        )
        up = settings.upstream
        forwarder = Forwarder(
            UpstreamConfig(
                up.url,
                up.host_header,
                up.connect_timeout,
                up.read_timeout,
                up.pool_size,
                up.keepalive,
                settings.listen.max_ws_message_bytes,
                settings.listen.max_body_bytes,
            )
        )
        await forwarder.start()
        rewrites = state.metrics.blob_rewrites
        signer = BlobSigner(
            BlobKeys(state.redis, settings.redis.key_prefix),
            settings.prefix,
            settings.blobs,
            lambda outcome: rewrites.labels(outcome).inc(),
        )
        app[BLOBS] = blobs = BlobFetcher(state, signer, settings.blobs, state.audit)
        await blobs.start()
        app[GATE] = gate = Gate(
            settings.prefix,
            settings.forward,
            settings.identity,
            strict_audit=settings.audit.strict,
            state=state,
            forwarder=forwarder,
            audit_log=state.audit,
            metrics=state.metrics,
            live=state.live,
            refuse=refusal.refuse,
            assertion=state.assertion,
            blob_signer=signer,
            listen=settings.listen,
        )
        if settings.forward_auth.enabled:
            app[AUTHZ] = ForwardAuth(
                settings,
                state=state,
                audit_log=state.audit,
                metrics=state.metrics,
                vouch=gate.vouch,
            )
        sweeper = asyncio.create_task(
            _sweep_forever(state.workflow, settings.sweep_interval, state.metrics),
            name="grant-sweeper",
        )
        try:
            yield
        finally:
            await _cancel(sweeper)
            await blobs.close()
            await forwarder.close()

    return ctx


def _reloader(state: State) -> Ctx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = state.settings
        state.reloader = PolicyReloader(
            state, settings.policy_file, state.metrics, state.audit, watch=settings.policy_watch
        )
        await state.reloader.start()
        try:
            yield
        finally:
            await state.reloader.stop()  # before the audit log closes: a reload writes to it

    return ctx


async def _metadata_of(state: State, scope: str) -> tuple[dict[str, Any] | None, str | None] | None:
    """A recording's metadata for the sensitivity rules, waiting for it at most one fetch."""
    cache, meta = state.metadata, state.settings.metadata
    if cache is None or meta is None:
        return None, "recording metadata has not started"
    if not cache.applies(scope):
        return None
    found, why = await cache.lookup(scope, meta.timeout + 0.5)
    if found is None:
        return None, f"the metadata of {scope} is unknown ({why})"
    return found.to_json(), None


async def _sensitive(state: State, scope: str) -> tuple[Rule | None, str | None]:
    """The sensitivity rule a requested recording matches, or why its metadata is unknown."""
    found = await _metadata_of(state, scope)
    if found is None:  # not a recording the metadata describes
        return None, None
    meta, why = found
    if meta is None:
        return None, why
    return matching(state.config.policy.sensitivity, meta), None


async def _entitlement_of(state: State, grant_id: str) -> str | None:
    """The entitlement a grant was given under (None: an admin's grant, or none known)."""
    grant = await state.grants.get(grant_id)
    return grant.entitlement if grant is not None else None


def _prefetch(state: State, scope: str) -> None:
    """Fetch a granted recording's metadata in the background, before its first access."""
    if state.metadata is not None:
        state.metadata.prefetch(scope)


async def _cancel(task: asyncio.Task[None], within: float = 5.0) -> None:
    """Cancel a background task and wait for it, but never let it hold up the shutdown."""
    deadline = asyncio.get_running_loop().time() + within
    done: set[asyncio.Task[None]] = set()
    while not done and (left := deadline - asyncio.get_running_loop().time()) > 0:
        # Again every 0.1 s: a cancellation can be lost, taken for a timeout that expired
        # at the same moment (a Redis read with a timeout), and the task then goes on.
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=min(0.1, left))
    if not done:
        log.warning("%s did not stop within %.0fs of being cancelled", task.get_name(), within)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("%s ended with %r", task.get_name(), task.exception())


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
    prefix = app_state(request).settings.prefix
    raise web.HTTPNotFound(text=f"jitgate: no such endpoint under {prefix}\n")


async def _gate_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[GATE].handle(request)


async def _blob_handler(request: web.Request) -> web.StreamResponse:
    return await request.config_dict[BLOBS].handle(request)


async def _authz_handler(request: web.Request) -> web.StreamResponse:
    return await request.config_dict[AUTHZ].handle(request)
