"""Typed keys for the state the application holds (aiohttp AppKey)."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from .audit import AuditLog
from .audit.store import AuditStore
from .authorize import Authorizer
from .grants import RedisGrants
from .identity.assertion import AssertionSigner
from .identity.oidc import OidcClient
from .identity.session import Sessions
from .live import LiveConnections
from .metrics import Metrics
from .notify import Notifier
from .settings import Settings
from .workflow import Workflow

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
REDIS = web.AppKey("redis", Redis)
GRANTS = web.AppKey("grants", RedisGrants)
AUDIT = web.AppKey("audit", AuditLog)
AUDIT_STORE = web.AppKey("audit_store", AuditStore)  # set when the Redis audit sink is on
LIVE = web.AppKey("live", LiveConnections)
WORKFLOW = web.AppKey("workflow", Workflow)
NOTIFIER = web.AppKey("notifier", Notifier)  # set only when webhooks are configured
ASSERTION = web.AppKey("assertion", AssertionSigner)  # set when forward.assertion is on
SESSIONS = web.AppKey("sessions", Sessions)  # set when identity.oidc (or .session) is on
OIDC = web.AppKey("oidc", OidcClient)  # set when identity.oidc is on
# One slot holding the current Authorizer: a reload swaps it whole.
AUTHORIZER = web.AppKey("authorizer", list[Authorizer])
