"""The application's state, typed, in one object: what handlers and components read.

`Config` is immutable (settings, the compiled policy with its grant check, the identity
verifier): a policy reload builds a new one and swaps it whole, so a request that read
it once sees one policy from its decision to its audit record. `State` holds the current
`Config` and the running resources, each set by its own cleanup context in app.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from .authorize import Authorizer
from .identity import Caller, Verifier, identify
from .policy import Policy
from .settings import Settings

if TYPE_CHECKING:  # the resources' types only: importing state starts nothing
    import aiohttp
    from redis.asyncio import Redis

    from .audit import AuditLog
    from .audit.store import AuditStore
    from .breaker import Breaker
    from .grantstore import RedisGrants
    from .grantview import GrantView
    from .identity.assertion import AssertionSigner
    from .identity.oidc import OidcClient
    from .identity.session import Sessions
    from .live import LiveConnections
    from .metadata import MetadataCache
    from .metrics import Metrics
    from .notify import Notifier
    from .reload import PolicyReloader
    from .workflow import Workflow


@dataclass(frozen=True)
class Config:
    """Settings, policy and verifier: swapped whole, never changed in place."""

    settings: Settings
    authorizer: Authorizer  # the compiled policy with the grant check
    verifier: Verifier

    @property
    def policy(self) -> Policy:
        return self.authorizer.policy


class State:
    """The current Config and the running resources (set as each one starts)."""

    config: Config
    metrics: Metrics
    http: aiohttp.ClientSession  # discovery and JWKS fetches, apart from the upstream pool
    redis: Redis
    grants: RedisGrants
    breaker: Breaker  # in front of the grant check: quick 503s while Redis is in trouble
    audit: AuditLog
    live: LiveConnections
    workflow: Workflow
    reloader: PolicyReloader
    grant_view: GrantView | None = None  # with redis.local_view
    audit_store: AuditStore | None = None  # with the Redis audit sink
    sessions: Sessions | None = None  # with identity.session (or identity.oidc)
    oidc: OidcClient | None = None  # with identity.oidc
    assertion: AssertionSigner | None = None  # with forward.assertion
    notifier: Notifier | None = None  # with notifications.webhooks
    metadata: MetadataCache | None = None  # with a metadata section: whose recording it is

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings  # fixed for the process; also in every Config
        self.metrics = metrics

    async def identify(self, request: web.Request) -> Caller:
        """Who `request` is from: verified once, then read from the request."""
        return await identify(request, self.config.verifier, self.sessions)


STATE = web.AppKey("state", State)


def app_state(request: web.Request) -> State:
    """The state of the application serving `request` (also from a sub-application)."""
    return request.config_dict[STATE]
