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

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from ..errors import ConfigError, ConfigErrors
from . import audit as auditsettings
from . import identity as identitysettings
from .audit import AuditSettings
from .identity import AssertionSettings, IdentitySettings
from .read import Reader, Secret, as_node, http_url, resolve, seconds
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
class RedisSettings:
    url: str | None = None  # None: jitgate runs its own redis-server in state_dir
    timeout: float = 1.0
    key_prefix: str = "jit:"
    max_connections: int = 512
    local_view: bool = True  # answer repeated grant checks from memory (grantview.py)
    view_lag: float = 0.1  # ... only while every change older than this has been seen


@dataclass(frozen=True)
class ForwardSettings:
    pass_authorization: bool = False
    pass_identity_cookie: bool = False
    reject_semicolons: bool = True
    reject_underscore_headers: bool = True  # 400 for X_Forwarded_User and its kind
    assertion: AssertionSettings | None = None
    user_headers: bool = False  # also send X-Forwarded-User, -Email and -Groups
    status_bar: bool = False  # inject the grant's countdown bar into HTML pages (statusbar.py)
    identity_headers: tuple[str, ...] = (
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-jitgate-user",
        "x-jitgate-assertion",
    )
    # What the upstream receives (hygiene.py, docs/upstream.md): names or `X-Prefix-*`
    # patterns dropped beside the maintained list; the proxies whose X-Forwarded-For and
    # Forwarded chain is kept and appended to; the client's Host sent upstream, checked.
    drop_headers: tuple[str, ...] = ()
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    preserve_host: bool = False
    allowed_hosts: tuple[str, ...] = ()


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
        | {"forward_auth"},
        "",
    )

    s = r.section(raw, "listen", "listen")
    r.known(s, {"host", "port", "workers"}, "listen")
    workers = workers_count(1 if s.get("workers") is None else s["workers"])
    if workers is None:
        r.error(s, "workers", "listen.workers", "must be a positive integer or auto")
    listen = ListenSettings(
        host=r.get(s, "host", str, "127.0.0.1", "listen.host"),
        port=r.get(s, "port", int, 8080, "listen.port"),
        workers=workers or 1,
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

    s = r.section(raw, "redis", "redis")
    r.known(
        s, {"url", "timeout", "key_prefix", "max_connections", "local_view", "view_lag"}, "redis"
    )
    redis_url = r.optional_str(s, "url", None, "redis.url") or None
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        r.error(s, "url", "redis.url", "must start with redis://, rediss:// or unix://")
    redis = RedisSettings(
        url=redis_url,
        timeout=r.positive(s, "timeout", float, 1.0, "redis.timeout"),
        key_prefix=r.get(s, "key_prefix", str, "jit:", "redis.key_prefix"),
        max_connections=r.positive(s, "max_connections", int, 512, "redis.max_connections"),
        local_view=r.get(s, "local_view", bool, True, "redis.local_view"),
        view_lag=r.positive(s, "view_lag", float, 0.1, "redis.view_lag"),
    )

    prefix = r.get(raw, "prefix", str, "/_jit", "prefix").rstrip("/")
    if not prefix.startswith("/") or len(prefix) < 2 or "//" in prefix:
        r.error(raw, "prefix", "prefix", "must be an absolute path such as /_jit")
    identity = identitysettings.identity(r, r.section(raw, "identity", "identity"), base, prefix)

    state_dir = resolve(base, r.get(raw, "state_dir", str, "../.jitgate", "state_dir"))
    audit = auditsettings.audit(r, r.section(raw, "audit", "audit"), base, state_dir)

    forward = _forward(
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
    )
    if r.errors:
        raise ConfigErrors(r.errors)
    return settings


def _forward(
    r: Reader,
    s: Node,
    base: Path,
    state_dir: Path,
    upstream_url: URL,
    host_header: str | None = None,
) -> ForwardSettings:
    at = "forward"
    r.known(
        s,
        {"pass_authorization", "pass_identity_cookie", "reject_semicolons", "identity_headers"}
        | {"reject_underscore_headers", "assertion", "user_headers", "status_bar"}
        | {"drop_headers", "trusted_proxies", "preserve_host", "allowed_hosts"},
        at,
    )
    defaults = ForwardSettings()
    assertion = None
    raw = s.get("assertion")
    if raw is True or isinstance(raw, dict):
        node = r.section(s, "assertion", f"{at}.assertion") if raw is not True else as_node({}, 0)
        assertion = identitysettings.assertion(r, node, base, state_dir, upstream_url)
    elif raw not in (None, False):
        r.error(s, "assertion", f"{at}.assertion", "must be true, false or a mapping")
    return ForwardSettings(
        pass_authorization=r.get(s, "pass_authorization", bool, False, f"{at}.pass_authorization"),
        pass_identity_cookie=r.get(
            s, "pass_identity_cookie", bool, False, f"{at}.pass_identity_cookie"
        ),
        reject_semicolons=r.get(s, "reject_semicolons", bool, True, f"{at}.reject_semicolons"),
        reject_underscore_headers=r.get(
            s, "reject_underscore_headers", bool, True, f"{at}.reject_underscore_headers"
        ),
        assertion=assertion,
        user_headers=r.get(s, "user_headers", bool, False, f"{at}.user_headers"),
        status_bar=r.get(s, "status_bar", bool, False, f"{at}.status_bar"),
        identity_headers=tuple(
            h.lower().replace("_", "-")
            for h in r.str_list(
                s, "identity_headers", defaults.identity_headers, f"{at}.identity_headers"
            )
        ),
        **_upstream_headers(r, s, host_header),
    )


def _upstream_headers(r: Reader, s: Node, host_header: str | None) -> dict[str, Any]:
    """forward.drop_headers, trusted_proxies, preserve_host and allowed_hosts."""
    at = "forward"
    drop = r.str_list(s, "drop_headers", (), f"{at}.drop_headers")
    for name in drop:
        why = _pattern_error(name)
        if why is not None:
            r.error(s, "drop_headers", f"{at}.drop_headers", f"{name!r} {why}")
    where = f"{at}.trusted_proxies"
    nets: list[IPv4Network | IPv6Network] = []
    for text in r.str_list(s, "trusted_proxies", (), where):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            r.error(s, "trusted_proxies", where, f"{text!r} is not a CIDR: {exc}")
            continue
        if net.prefixlen == 0:
            r.error(s, "trusted_proxies", where, f"{text!r} would trust every client")
            continue
        nets.append(net)
    preserve = r.get(s, "preserve_host", bool, False, f"{at}.preserve_host")
    hosts = tuple(
        h.strip().lower() for h in r.str_list(s, "allowed_hosts", (), f"{at}.allowed_hosts")
    )
    for host in hosts:
        if not host or hostname(host) != host or "*" in host or "/" in host:
            message = f"{host!r} is not a host name (no port, scheme or wildcard)"
            r.error(s, "allowed_hosts", f"{at}.allowed_hosts", message)
    if preserve and not hosts:
        message = (
            "is required with preserve_host: the host names users reach jitgate by, e.g. "
            "[replay.example.com]; any other Host is refused rather than sent upstream"
        )
        r.error(s, "allowed_hosts", f"{at}.allowed_hosts", message)
    if preserve and host_header:
        message = "and upstream.host_header both name the Host sent upstream: set one"
        r.error(s, "preserve_host", f"{at}.preserve_host", message)
    return {
        "drop_headers": tuple(drop),
        "trusted_proxies": tuple(nets),
        "preserve_host": preserve,
        "allowed_hosts": hosts,
    }


_TOKEN = frozenset("!#$%&'+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _pattern_error(name: str) -> str | None:
    """Why `name` is no header name or `X-Prefix-*` pattern, or None if it is one."""
    body = name[:-1] if name.endswith("*") else name
    if not body or not all(c in _TOKEN for c in body):
        return "is not a header name or a prefix such as X-Remote-*"
    if name.endswith("*") and len(body) < 3:
        return "is too short a prefix: it would drop headers the upstream needs"
    return None


def hostname(host: str) -> str:
    """A Host header's name without its port, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _forward_auth(r: Reader, s: Node) -> ForwardAuthSettings:
    at = "forward_auth"
    r.known(s, {"enabled", "trusted_proxies"}, at)
    enabled = r.get(s, "enabled", bool, False, f"{at}.enabled")
    where = f"{at}.trusted_proxies"
    nets: list[IPv4Network | IPv6Network] = []
    for text in r.str_list(s, "trusted_proxies", (), where):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            r.error(s, "trusted_proxies", where, f"{text!r} is not a CIDR: {exc}")
            continue
        if net.prefixlen == 0:
            r.error(s, "trusted_proxies", where, f"{text!r} would trust every client")
            continue
        nets.append(net)
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
