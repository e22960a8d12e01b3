"""Settings: frozen dataclasses, one loader, one validate().

The small sections are read here; the `identity` section (and `forward.assertion`) in
identity.py, the `audit` section in audit.py, all on the reading layer of read.py.

Relative paths in the config file are resolved against the file's directory.
Any field can be overridden from the environment: `JITGATE_` followed by the
field's path in upper case with `__` between levels, for example
`JITGATE_UPSTREAM__URL=http://10.0.0.5:8000` or `JITGATE_REDIS__URL=redis://r:6379/0`.
Values are parsed as YAML scalars, so `JITGATE_AUDIT__STDOUT=true` is a bool.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import yaml
from yarl import URL

from ..errors import ConfigError, ConfigErrors
from . import audit as auditsettings
from . import forward as forwardsettings
from . import identity as identitysettings
from . import metadata as metadatasettings
from .audit import AuditSettings
from .blobs import BlobSettings, blobs
from .forward import ForwardSettings
from .identity import IdentitySettings
from .metadata import MetadataSettings
from .read import Reader, Secret, http_url, resolve, seconds
from .yamlsrc import Node, load_file

ENV_PREFIX = "JITGATE_"
DEFAULT_CONFIG = Path("config/jitgate.yaml")
NOTIFY_EVENTS = ("requested", "approved", "denied", "break_glass", "expiring")
NOTIFY_FORMATS = ("json", "slack")


@dataclass(frozen=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # processes serving the port (SO_REUSEPORT); `auto` in the file: cores
    # What a client may send (listener.py): longer lines or more headers get a 400.
    max_line_bytes: int = 8190  # the request line
    max_field_bytes: int = 8190  # one header line
    max_headers: int = 100
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    max_body_bytes: int = 64 * 1024 * 1024  # a forwarded request body; over it: 413
    max_ws_message_bytes: int = 4 * 1024 * 1024  # a WebSocket message, either way; over: 1009


_LIMITS = {
    "max_line_bytes", "max_field_bytes", "max_headers", "max_body_bytes", "max_ws_message_bytes",
}  # fmt: skip


def usable_cores() -> int:
    """Return how many cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def workers_count(value: object) -> int | None:
    """Read a worker count: a positive integer or `auto` (the usable cores); None if neither."""
    if value == "auto":
        return usable_cores()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


@dataclass(frozen=True)
class UpstreamSettings:
    url: URL = field(default_factory=lambda: URL("http://127.0.0.1:8081"))
    host_header: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 100
    keepalive: float = 15.0  # seconds an idle upstream connection is kept for reuse


@dataclass(frozen=True)
class SentinelSettings:
    """A master that Redis Sentinel watches and fails over; clients ask the sentinels for it."""

    master: str  # the name the sentinels monitor it by
    sentinels: tuple[tuple[str, int], ...]
    username: str | None = None  # the Redis ACL user on the master and its replicas
    password: Secret | None = None
    db: int = 0
    sentinel_username: str | None = None  # for the sentinels themselves
    sentinel_password: Secret | None = None
    tls: bool = False  # TLS to the sentinels and to Redis
    tls_ca_file: Path | None = None  # the CA that signed their certificates (default: system's)


@dataclass(frozen=True)
class ClusterSettings:
    """A Redis Cluster; jitgate's keys share one hash slot, served by that slot's master."""

    nodes: tuple[tuple[str, int], ...]  # where to ask for the slots' masters first
    username: str | None = None
    password: Secret | None = None
    tls: bool = False
    tls_ca_file: Path | None = None


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = None  # None (no sentinel, no cluster): jitgate runs its own redis-server
    sentinel: SentinelSettings | None = None
    cluster: ClusterSettings | None = None
    wait_replicas: int = 0  # grant changes wait for this many replicas to acknowledge them
    wait_timeout: float = 0.5  # ... for at most this long
    timeout: float = 1.0
    key_prefix: str = "jit:"
    max_connections: int = 512
    local_view: bool = True  # answer repeated grant checks from memory (grantview.py)
    view_lag: float = 0.1  # ... only while every change older than this has been seen
    breaker_trip_after: float = 0.05  # a grant check unanswered this long opens the breaker
    breaker_probe_every: float = 0.1  # while open, Redis is pinged at most this often

    @property
    def embedded(self) -> bool:
        """Whether jitgate runs its own redis-server (no Redis is configured)."""
        return self.url is None and self.sentinel is None and self.cluster is None


@dataclass(frozen=True)
class ForwardAuthSettings:
    """Forward-auth (`{prefix}/authz`): decisions for nginx, Traefik or Envoy in front."""

    enabled: bool = False
    # Only these peers may name the original request (X-Original-URI, X-Forwarded-Uri, ...).
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()


@dataclass(frozen=True)
class AdminSettings:
    """Who may list every grant and revoke any (the security team)."""

    groups: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()


@dataclass(frozen=True)
class WebhookSettings:
    url: Secret  # a Slack webhook URL is a credential: its path is the key
    format: str = "json"  # json | slack
    events: frozenset[str] = frozenset(NOTIFY_EVENTS)
    timeout: float = 5.0

    @property
    def origin(self) -> str:
        """Return scheme://host[:port], safe to log."""
        return str(URL(self.url.reveal()).origin())


@dataclass(frozen=True)
class NotificationSettings:
    public_url: str | None = None  # jitgate's address as users reach it, for links
    expiring_before: float = 300.0
    check_interval: float = 10.0  # how often each replica looks for grants about to expire
    retries: int = 4  # after the first attempt
    backoff: float = 0.5  # seconds before the first retry, doubling each time
    queue_max: int = 10_000
    webhooks: tuple[WebhookSettings, ...] = ()


@dataclass(frozen=True)
class Settings:
    file: Path
    listen: ListenSettings = field(default_factory=ListenSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    policy_file: Path = Path("policy.yaml")
    policy_watch: bool = True  # reload the policy when its file changes
    prefix: str = "/_jit"
    state_dir: Path = Path(".jitgate")
    grant_max_ttl: float = 7 * 24 * 3600.0
    admins: AdminSettings = field(default_factory=AdminSettings)
    sweep_interval: float = 5.0  # how often expiries and lapses are written down
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
    forward_auth: ForwardAuthSettings = field(default_factory=ForwardAuthSettings)
    metadata: MetadataSettings | None = None  # whose recording it is (proxy/metadata/)
    blobs: BlobSettings = field(default_factory=BlobSettings)  # presigned URLs (blobs.py)


def _env_overrides(raw: Node, environ: Mapping[str, str]) -> dict[str, str]:
    """Apply JITGATE_A__B=value overrides onto the raw tree; return field -> env name."""
    applied: dict[str, str] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "JITGATE_CONFIG":
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            continue
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, Node):
                child = Node()
                child.line, child.key_lines = 0, {}
                node[part] = child
            node = child
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node[parts[-1]] = value
        node.key_lines[parts[-1]] = 0
        applied[".".join(parts)] = name
    return applied


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, override from the environment and validate one config file."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = Path(environ.get("JITGATE_CONFIG", str(DEFAULT_CONFIG)))
    raw = load_file(path)
    if raw is None:
        raw = Node()
        raw.line, raw.key_lines = 1, {}
    if not isinstance(raw, Node):
        raise ConfigError("the config file must be a mapping", file=str(path), line=1)
    env_keys = _env_overrides(raw, environ)
    return validate(raw, path, env_keys, environ)


def validate(
    raw: Node,
    path: Path,
    env_keys: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Turn a parsed config tree into Settings, or raise ConfigErrors listing every problem."""
    r = Reader(str(path), env_keys or {}, os.environ if environ is None else environ)
    base = path.parent
    r.known(
        raw,
        {"listen", "upstream", "redis", "identity", "audit", "forward", "policy", "prefix"}
        | {"state_dir", "grant_max_ttl", "admins", "notifications", "sweep_interval"}
        | {"forward_auth", "metadata", "blobs"},
        "",
    )

    s = r.section(raw, "listen", "listen")
    r.known(s, {"host", "port", "workers", "keepalive_timeout"} | _LIMITS, "listen")
    workers = workers_count(1 if s.get("workers") is None else s["workers"])
    if workers is None:
        r.error(s, "workers", "listen.workers", "must be a positive integer or auto")
    listen = ListenSettings(
        host=r.get(s, "host", str, "127.0.0.1", "listen.host"),
        port=r.get(s, "port", int, 8080, "listen.port"),
        workers=workers or 1,
        keepalive_timeout=r.positive(
            s, "keepalive_timeout", float, 75.0, "listen.keepalive_timeout"
        ),
        **{k: r.positive(s, k, int, getattr(ListenSettings, k), f"listen.{k}") for k in _LIMITS},
    )
    if not 0 <= listen.port <= 65535:
        r.error(s, "port", "listen.port", "must be between 0 and 65535")

    s = r.section(raw, "upstream", "upstream")
    r.known(
        s,
        {"url", "host_header", "connect_timeout", "read_timeout", "pool_size", "keepalive"},
        "upstream",
    )
    url_text = r.get(s, "url", str, "", "upstream.url")
    upstream_url = URL(url_text) if url_text else URL()
    if not url_text:
        r.error(s, "url", "upstream.url", "is required")
    elif upstream_url.scheme not in ("http", "https") or not upstream_url.host:
        r.error(s, "url", "upstream.url", f"must be an http(s) URL with a host, got {url_text!r}")
    upstream = UpstreamSettings(
        url=upstream_url,
        host_header=r.optional_str(s, "host_header", None, "upstream.host_header"),
        connect_timeout=r.positive(s, "connect_timeout", float, 5.0, "upstream.connect_timeout"),
        read_timeout=r.positive(s, "read_timeout", float, 60.0, "upstream.read_timeout"),
        pool_size=r.positive(s, "pool_size", int, 100, "upstream.pool_size"),
        keepalive=r.positive(s, "keepalive", float, 15.0, "upstream.keepalive"),
    )

    redis = _redis(r, r.section(raw, "redis", "redis"), base)

    prefix = r.get(raw, "prefix", str, "/_jit", "prefix").rstrip("/")
    if not prefix.startswith("/") or len(prefix) < 2 or "//" in prefix:
        r.error(raw, "prefix", "prefix", "must be an absolute path such as /_jit")
    identity = identitysettings.identity(r, r.section(raw, "identity", "identity"), base, prefix)

    state_dir = resolve(base, r.get(raw, "state_dir", str, "../.jitgate", "state_dir"))
    audit = auditsettings.audit(r, r.section(raw, "audit", "audit"), base, state_dir)

    forward = forwardsettings.forward(
        r, r.section(raw, "forward", "forward"), base, state_dir, upstream_url, upstream.host_header
    )

    s = r.section(raw, "admins", "admins")
    r.known(s, {"groups", "users"}, "admins")
    admins = AdminSettings(
        groups=frozenset(r.str_list(s, "groups", (), "admins.groups")),
        users=frozenset(r.str_list(s, "users", (), "admins.users")),
    )

    s = r.section(raw, "policy", "policy")
    r.known(s, {"file", "watch"}, "policy")
    policy_file = resolve(base, r.get(s, "file", str, "policy.yaml", "policy.file"))
    policy_watch = r.get(s, "watch", bool, True, "policy.watch")

    notifications = _notifications(r, r.section(raw, "notifications", "notifications"))
    forward_auth = _forward_auth(r, r.section(raw, "forward_auth", "forward_auth"))
    meta = metadatasettings.metadata(
        r, raw, r.section(raw, "metadata", "metadata"), base, audit.hmac_key
    )

    settings = Settings(
        file=path,
        listen=listen,
        upstream=upstream,
        redis=redis,
        identity=identity,
        audit=audit,
        forward=forward,
        policy_file=policy_file,
        policy_watch=policy_watch,
        prefix=prefix,
        state_dir=state_dir,
        grant_max_ttl=r.positive(raw, "grant_max_ttl", float, 7 * 24 * 3600.0, "grant_max_ttl"),
        admins=admins,
        sweep_interval=r.positive(raw, "sweep_interval", float, 5.0, "sweep_interval"),
        notifications=notifications,
        forward_auth=forward_auth,
        metadata=meta,
        blobs=blobs(r, r.section(raw, "blobs", "blobs")),
    )
    if r.errors:
        raise ConfigErrors(r.errors)
    return settings


def _redis(r: Reader, s: Node, base: Path) -> RedisSettings:
    at = "redis"
    r.known(
        s,
        {"url", "sentinel", "cluster", "timeout", "key_prefix", "max_connections", "local_view"}
        | {"view_lag", "wait_replicas", "wait_timeout", "breaker_trip_after"}
        | {"breaker_probe_every"},
        at,
    )
    url = r.optional_str(s, "url", None, f"{at}.url") or None
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        r.error(s, "url", f"{at}.url", "must start with redis://, rediss:// or unix://")
    sentinel = cluster = None
    if s.get("sentinel") is not None:
        sentinel = _sentinel(r, r.section(s, "sentinel", f"{at}.sentinel"), base)
    if s.get("cluster") is not None:
        cluster = _cluster(r, r.section(s, "cluster", f"{at}.cluster"), base)
    chosen = [k for k in ("url", "sentinel", "cluster") if s.get(k) is not None]
    if len(chosen) > 1:
        message = "set only one of redis.url, redis.sentinel and redis.cluster"
        r.error(s, chosen[-1], f"{at}.{chosen[-1]}", message)
    key_prefix = r.get(s, "key_prefix", str, "jit:", f"{at}.key_prefix")
    if cluster is not None and not _HASH_TAG.search(key_prefix):
        message = (
            "must carry a hash tag such as '{jit}:' with redis.cluster, so that every key "
            f"jitgate writes is in one hash slot; got {key_prefix!r}"
        )
        r.error(s, "key_prefix", f"{at}.key_prefix", message)
    wait_replicas = r.get(s, "wait_replicas", int, 0, f"{at}.wait_replicas")
    if wait_replicas < 0:
        r.error(s, "wait_replicas", f"{at}.wait_replicas", "must not be negative")
    timeout = r.positive(s, "timeout", float, 1.0, f"{at}.timeout")
    wait_timeout = r.positive(s, "wait_timeout", float, min(0.5, timeout / 2), f"{at}.wait_timeout")
    if wait_timeout >= timeout:
        message = f"must be shorter than redis.timeout ({timeout:g}s), which WAIT runs within"
        r.error(s, "wait_timeout", f"{at}.wait_timeout", message)
    return RedisSettings(
        url=url,
        sentinel=sentinel,
        cluster=cluster,
        wait_replicas=max(0, wait_replicas),
        wait_timeout=wait_timeout,
        timeout=timeout,
        key_prefix=key_prefix,
        max_connections=r.positive(s, "max_connections", int, 512, f"{at}.max_connections"),
        local_view=r.get(s, "local_view", bool, True, f"{at}.local_view"),
        view_lag=r.positive(s, "view_lag", float, 0.1, f"{at}.view_lag"),
        breaker_trip_after=r.positive(
            s, "breaker_trip_after", float, 0.05, f"{at}.breaker_trip_after"
        ),
        breaker_probe_every=r.positive(
            s, "breaker_probe_every", float, 0.1, f"{at}.breaker_probe_every"
        ),
    )


def _sentinel(r: Reader, s: Node, base: Path) -> SentinelSettings:
    at = "redis.sentinel"
    keys = {"master", "sentinels", "db", "sentinel_username", "sentinel_password"}
    r.known(s, _SERVER_KEYS | keys, at)
    master = r.get(s, "master", str, "", f"{at}.master")
    if not master:
        r.error(s, "master", f"{at}.master", "is required: the name the sentinels monitor")
    db = r.get(s, "db", int, 0, f"{at}.db")
    if db < 0:
        r.error(s, "db", f"{at}.db", "must not be negative")
    sentinel_password = r.optional_str(s, "sentinel_password", None, f"{at}.sentinel_password")
    username, password, tls, ca_file = _server_access(r, s, base, at)
    return SentinelSettings(
        master=master,
        sentinels=_addresses(r, s, "sentinels", 26379, at),
        username=username,
        password=password,
        db=max(0, db),
        sentinel_username=r.optional_str(s, "sentinel_username", None, f"{at}.sentinel_username")
        or None,
        sentinel_password=Secret(sentinel_password) if sentinel_password else None,
        tls=tls,
        tls_ca_file=ca_file,
    )


def _cluster(r: Reader, s: Node, base: Path) -> ClusterSettings:
    at = "redis.cluster"
    r.known(s, _SERVER_KEYS | {"nodes"}, at)
    username, password, tls, ca_file = _server_access(r, s, base, at)
    return ClusterSettings(
        nodes=_addresses(r, s, "nodes", 6379, at),
        username=username,
        password=password,
        tls=tls,
        tls_ca_file=ca_file,
    )


_SERVER_KEYS = {"username", "password", "tls", "tls_ca_file"}
_HASH_TAG = re.compile(r"\{[^}]+\}")  # as Redis reads it: the first {...}, not empty


def _server_access(
    r: Reader, s: Node, base: Path, at: str
) -> tuple[str | None, Secret | None, bool, Path | None]:
    """Read the AUTH user and password and the TLS settings of Redis servers."""
    password = r.optional_str(s, "password", None, f"{at}.password")
    tls = r.get(s, "tls", bool, False, f"{at}.tls")
    ca_text = r.optional_str(s, "tls_ca_file", None, f"{at}.tls_ca_file")
    ca_file = resolve(base, ca_text) if ca_text else None
    if ca_file is not None and not ca_file.is_file():
        r.error(s, "tls_ca_file", f"{at}.tls_ca_file", f"no such file: {ca_file}")
    elif ca_file is not None and not tls:
        r.error(s, "tls_ca_file", f"{at}.tls_ca_file", f"needs {at}.tls: true")
    username = r.optional_str(s, "username", None, f"{at}.username") or None
    return username, Secret(password) if password else None, tls, ca_file


def _addresses(r: Reader, s: Node, key: str, port: int, at: str) -> tuple[tuple[str, int], ...]:
    found = []
    for text in r.str_list(s, key, (), f"{at}.{key}"):
        address = _host_port(text, port)
        if address is None:
            message = f"must be host:port addresses such as 10.0.0.5:{port}, got {text!r}"
            r.error(s, key, f"{at}.{key}", message)
        else:
            found.append(address)
    if not found and key not in s:
        r.error(s, key, f"{at}.{key}", "is required: host:port addresses")
    elif not found:
        r.error(s, key, f"{at}.{key}", "must name at least one address")
    return tuple(found)


def _host_port(text: str, default_port: int) -> tuple[str, int] | None:
    """Parse host:port, [v6]:port or a bare host; None if it is not one."""
    text = text.strip()
    if not text or any(c in text for c in "/@?#"):
        return None
    try:
        url = URL("tcp://" + text)
        host, port = url.host, url.explicit_port
    except ValueError:
        return None
    return (host, port or default_port) if host else None


def _forward_auth(r: Reader, s: Node) -> ForwardAuthSettings:
    at = "forward_auth"
    r.known(s, {"enabled", "trusted_proxies"}, at)
    enabled = r.get(s, "enabled", bool, False, f"{at}.enabled")
    where = f"{at}.trusted_proxies"
    nets = r.networks(s, "trusted_proxies", where)
    if enabled and not nets and not any(e.field == where for e in r.errors):
        message = (
            "is required with forward_auth.enabled: the addresses nginx, Traefik or Envoy "
            "connect from, e.g. [10.0.0.5/32]"
        )
        r.error(s, "trusted_proxies", where, message)
    return ForwardAuthSettings(enabled=enabled, trusted_proxies=tuple(nets))


def _notifications(r: Reader, s: Node) -> NotificationSettings:
    at = "notifications"
    keys = {"public_url", "expiring_before", "check_interval", "retries", "backoff", "queue_max"}
    r.known(s, keys | {"webhooks"}, at)
    public_url = r.optional_str(s, "public_url", None, f"{at}.public_url") or None
    if public_url is not None:
        url = http_url(public_url)
        if url is None or url.query_string or url.fragment:
            message = f"must be an http(s) URL with a host and no query, got {public_url!r}"
            r.error(s, "public_url", f"{at}.public_url", message)
        public_url = public_url.rstrip("/")
    retries = r.get(s, "retries", int, 4, f"{at}.retries")
    if retries < 0:
        r.error(s, "retries", f"{at}.retries", "must not be negative")
    defaults = NotificationSettings()
    return NotificationSettings(
        public_url=public_url,
        expiring_before=seconds(r, s, "expiring_before", defaults.expiring_before, at),
        check_interval=seconds(r, s, "check_interval", defaults.check_interval, at),
        retries=max(0, retries),
        backoff=r.positive(s, "backoff", float, defaults.backoff, f"{at}.backoff"),
        queue_max=r.positive(s, "queue_max", int, defaults.queue_max, f"{at}.queue_max"),
        webhooks=_webhooks(r, s),
    )


def _webhooks(r: Reader, s: Node) -> tuple[WebhookSettings, ...]:
    hooks = []
    for where, node in r.mappings(
        s, "webhooks", "notifications.webhooks", "{url, format, events, timeout}",
        "a mapping with a url",
    ):  # fmt: skip
        r.known(node, {"url", "format", "events", "timeout"}, where)
        url = r.get(node, "url", str, "", f"{where}.url")
        if not url:
            r.error(node, "url", f"{where}.url", "is required")
        elif http_url(url) is None:
            # The URL itself may hold a secret (Slack's do), so only its scheme is shown.
            scheme = url.partition(":")[0] if ":" in url else ""
            message = f"must be an http(s) URL with a host, got scheme {scheme!r}"
            r.error(node, "url", f"{where}.url", message)
        fmt = r.get(node, "format", str, "json", f"{where}.format")
        if fmt not in NOTIFY_FORMATS:
            message = f"must be one of {', '.join(NOTIFY_FORMATS)}, got {fmt!r}"
            r.error(node, "format", f"{where}.format", message)
        events = r.str_list(node, "events", NOTIFY_EVENTS, f"{where}.events")
        unknown = [e for e in events if e not in NOTIFY_EVENTS]
        if unknown:
            message = f"unknown event {unknown[0]!r} (events: {', '.join(NOTIFY_EVENTS)})"
            r.error(node, "events", f"{where}.events", message)
        elif not events:
            r.error(node, "events", f"{where}.events", "must name at least one event")
        hooks.append(
            WebhookSettings(
                url=Secret(url),
                format=fmt,
                events=frozenset(events),
                timeout=r.positive(node, "timeout", float, 5.0, f"{where}.timeout"),
            )
        )
    return tuple(hooks)
