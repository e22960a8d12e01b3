"""Settings: frozen dataclasses, one loader, one validate().

Relative paths in the config file are resolved against the file's directory.
Any field can be overridden from the environment: `JITGATE_` followed by the
field's path in upper case with `__` between levels, for example
`JITGATE_UPSTREAM__URL=http://10.0.0.5:8000` or `JITGATE_REDIS__URL=redis://r:6379/0`.
Values are parsed as YAML scalars, so `JITGATE_AUDIT__STDOUT=true` is a bool.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yarl import URL

from .errors import ConfigError, ConfigErrors
from .yamlsrc import Node, Seq, line_of, load_file

ENV_PREFIX = "JITGATE_"
DEFAULT_CONFIG = Path("config/jitgate.yaml")
SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384")
# Keys from a JWKS are public, so only asymmetric algorithms (proxy.jwks checks the same).
JWKS_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
ASSERTION_MAX_TTL = 300.0
NOTIFY_EVENTS = ("requested", "approved", "denied", "break_glass", "expiring")
NOTIFY_FORMATS = ("json", "slack")
AUDIT_HTTP_FORMATS = ("jsonl", "splunk", "elastic", "loki")


class Secret:
    """A secret string whose repr never shows the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class UpstreamSettings:
    url: URL = field(default_factory=lambda: URL("http://127.0.0.1:8081"))
    host_header: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 100


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = None  # None: jitgate runs its own redis-server in state_dir
    timeout: float = 1.0
    key_prefix: str = "jit:"
    max_connections: int = 512


# Where a claim is found: a string is a dotted path ("realm_access.roles"); a tuple (a
# YAML list) names one key per level, for claim names that contain dots themselves
# (["https://example.com/groups"]).
ClaimPath = str | tuple[str, ...]


@dataclass(frozen=True)
class IssuerSettings:
    """An identity provider whose keys come from its JWKS (jwks_uri, or OIDC discovery)."""

    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256",)
    jwks_uri: str | None = None  # None: from the issuer's discovery document
    subject_claim: ClaimPath | None = None  # None: identity.subject_claim, and so on
    email_claim: ClaimPath | None = None
    groups_claim: ClaimPath | None = None


@dataclass(frozen=True)
class TrustedHeadersSettings:
    """Identity set by an SSO proxy in front of jitgate, believed only from `sources`."""

    sources: tuple[IPv4Network | IPv6Network, ...]
    user: str = "X-Forwarded-User"
    email: str | None = "X-Forwarded-Email"
    groups: str | None = "X-Forwarded-Groups"
    groups_delimiter: str = ","
    # When set, identity comes only from this signed JWT (Pomerium, IAP), not plain headers.
    assertion_header: str | None = None
    assertion: IssuerSettings | None = None

    def names(self) -> tuple[str, ...]:
        """Every header this mode reads."""
        return tuple(h for h in (self.user, self.email, self.groups, self.assertion_header) if h)


@dataclass(frozen=True)
class OidcSettings:
    """Browser sign-in with an OpenID Connect provider: authorization code with PKCE (S256)."""

    issuer: str
    client_id: str
    public_url: str  # how browsers reach jitgate, e.g. https://jitgate.example.com
    redirect_path: str  # default {prefix}/oidc/callback; must lie under the prefix
    client_secret: Secret | None = None  # None: a public client, PKCE is its only proof
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    algorithms: tuple[str, ...] = ("RS256",)  # the ID token's
    post_logout_redirect: str | None = None  # None: public_url + {prefix}/login
    extra_auth_params: tuple[tuple[str, str], ...] = ()  # e.g. (("prompt", "login"),)
    login_timeout: float = 300.0  # state, nonce and PKCE verifier expire after this

    @property
    def redirect_uri(self) -> str:
        return self.public_url + self.redirect_path


SESSION_STORES = ("cookie", "redis")


@dataclass(frozen=True)
class SessionSettings:
    """The browser session an OIDC sign-in starts: encrypted, with server-side lifetimes."""

    keys: tuple[Secret, ...]  # Fernet keys: the first encrypts, every one decrypts
    cookie: str = "jitgate_session"
    secure: bool = True  # false only when identity.oidc.public_url is http on loopback
    max_age: float = 8 * 3600.0  # absolute lifetime from sign-in
    idle_timeout: float = 3600.0  # ends after this long without a request
    store: str = "cookie"  # cookie: the whole session, encrypted; redis: only a random id


@dataclass(frozen=True)
class IdentitySettings:
    bearer: bool = True
    cookie: str | None = "jitgate_token"
    algorithms: tuple[str, ...] = ("HS256",)  # the local keys': hs_secret, public_key_files
    hs_secret: Secret | None = None
    public_key_files: tuple[Path, ...] = ()
    issuer: str | None = None
    audience: str | None = None
    issuers: tuple[IssuerSettings, ...] = ()
    jwks_min_refetch_interval: float = 30.0  # at most one JWKS fetch per issuer this often
    jwks_max_age: float = 3600.0  # refresh a key set after this long (or its Cache-Control)
    subject_claim: ClaimPath = "sub"
    email_claim: ClaimPath = "email"
    groups_claim: ClaimPath = "groups"
    groups_delimiter: str | None = None  # None: commas or whitespace
    group_aliases: tuple[tuple[str, str], ...] = ()  # IdP group name -> the policy's name
    trusted_headers: TrustedHeadersSettings | None = None
    oidc: OidcSettings | None = None
    session: SessionSettings | None = None
    leeway: float = 30.0
    max_token_bytes: int = 8192
    cache_size: int = 10_000  # verified tokens remembered until their exp (LRU)
    dev_key: Secret | None = None  # HS256 secret that `jitgate token mint` signs with
    dev_key_file: Path | None = None  # or a PEM private key (RS256/ES256)
    mint_ttl: float = 3600.0


@dataclass(frozen=True)
class RedisSinkSettings:
    stream: str = "audit"  # key after redis.key_prefix; its indexes live under <key>:idx:
    maxlen: int | None = 1_000_000  # oldest records (and their index entries) trimmed beyond
    retention: float | None = None  # seconds a record is kept; None: until maxlen trims it


@dataclass(frozen=True)
class FileSinkSettings:
    path: Path
    rotate_bytes: int | None = None  # rotate when the file would grow past this size
    rotate_daily: bool = False  # rotate when the UTC day changes
    retention: float | None = None  # delete rotated files older than this many seconds
    fsync: bool = True


@dataclass(frozen=True)
class HttpSinkSettings:
    name: str
    url: Secret  # an ingest URL may carry a token
    format: str = "jsonl"  # jsonl | splunk | elastic | loki
    headers: tuple[tuple[str, Secret], ...] = ()
    timeout: float = 10.0
    gzip: bool = False


@dataclass(frozen=True)
class AuditSettings:
    redis: RedisSinkSettings | None = field(default_factory=RedisSinkSettings)  # None: off
    file: FileSinkSettings | None = None
    stdout: bool = False
    http: tuple[HttpSinkSettings, ...] = ()
    spool_dir: Path | None = None  # default: <state_dir>/audit-spool; `spool: null` turns it off
    spool: bool = True
    spool_max_bytes: int = 1 << 30
    strict: bool = False  # refuse protected requests with 503 while audit cannot be written
    maintain_interval: float = 60.0  # seconds between trims, rotations and retention runs
    batch_size: int = 256
    flush_interval: float = 0.25
    queue_max: int = 100_000
    hmac_key: Secret | None = None  # set: records form a tamper-evident HMAC chain
    key_id: str = "k1"
    checkpoint_every: int = 1000  # records between signed checkpoints
    checkpoint_interval: float = 60.0  # or seconds, whichever comes first


@dataclass(frozen=True)
class AssertionSettings:
    """A signed JWT naming the user, sent upstream with every request that has one."""

    key_file: Path  # PEM private key (EC P-256: ES256, RSA: RS256)
    generate: bool  # key_file was not configured: made at start if missing (in state_dir)
    audience: str  # default: upstream.url
    header: str = "X-Jitgate-Assertion"
    ttl: float = 60.0  # at most 300
    issuer: str = "jitgate"


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


T = TypeVar("T")


class _Reader:
    """Walk a parsed YAML tree, collecting every error with its file:line."""

    def __init__(self, file: str, env_keys: Mapping[str, str], environ: Mapping[str, str]) -> None:
        self.file = file
        self.env_keys = env_keys
        self.environ = environ  # for ${VAR} in audit.http headers
        self.errors: list[ConfigError] = []

    def error(self, node: Node | Seq | None, key: str | int, where: str, message: str) -> None:
        # A field inside a value set by one variable (e.g. a YAML list) is that variable's.
        env = next(
            (
                name
                for at, name in self.env_keys.items()
                if where == at or where.startswith((at + ".", at + "["))
            ),
            None,
        )
        if env is not None:
            self.errors.append(ConfigError(message, file=f"env {env}", field=where))
            return
        line = line_of(node, key)
        self.errors.append(ConfigError(message, file=self.file, line=line, field=where))

    def section(self, node: Node, key: str, where: str) -> Node:
        value = node.get(key)
        if value is None:
            empty = Node()
            empty.line, empty.key_lines = node.line_of(key), {}
            return empty
        if not isinstance(value, Node):
            self.error(node, key, where, "must be a mapping")
            empty = Node()
            empty.line, empty.key_lines = node.line_of(key), {}
            return empty
        return value

    def known(self, node: Node, keys: set[str], where: str) -> None:
        for key in node:
            if key not in keys:
                hint = f" (known: {', '.join(sorted(keys))})"
                self.error(node, key, f"{where}.{key}".lstrip("."), "unknown field" + hint)

    def get(self, node: Node, key: str, kind: type[T], default: T, where: str) -> T:
        if key not in node or node[key] is None:
            return default
        value = node[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            self.error(node, key, where, "must be an integer")
            return default
        if not isinstance(value, kind):
            self.error(node, key, where, f"must be {_kind_name(kind)}, got {value!r}")
            return default
        return value

    def positive(self, node: Node, key: str, kind: type[T], default: T, where: str) -> T:
        value = self.get(node, key, kind, default, where)
        if isinstance(value, int | float) and value <= 0:
            self.error(node, key, where, "must be greater than 0")
            return default
        return value

    def optional_str(self, node: Node, key: str, default: str | None, where: str) -> str | None:
        if key in node and node[key] is None:
            return None
        return self.get(node, key, str, default or "", where) if key in node else default

    def str_list(
        self, node: Node, key: str, default: tuple[str, ...], where: str
    ) -> tuple[str, ...]:
        if key not in node or node[key] is None:
            return default
        value = node[key]
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(node, key, where, "must be a list of strings")
            return default
        return tuple(value)

    def str_map(self, s: Node, key: str, where: str, keys: str, example: str) -> dict[str, str]:
        """Return the mapping of strings at s[key] ({} when absent); report anything else."""
        value = s.get(key) or {}
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        self.error(s, key, where, f"must map {keys} to strings, e.g. {example}")
        return {}

    def mappings(self, s: Node, key: str, at: str, shape: str, item: str) -> list[tuple[str, Node]]:
        """Return (where, node) for each mapping in the list at s[key]; report the others.

        shape describes the list's items for an error ("{url, format}"), item what each
        must be ("a mapping with a url").
        """
        raw = s.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.error(s, key, at, f"must be a list of {shape}")
            return []
        out = []
        for i, value in enumerate(raw):
            where = f"{at}[{i}]"
            if not isinstance(value, dict):
                if isinstance(raw, Seq):
                    self.error(raw, i, where, f"must be {item}")
                else:  # a list from an environment variable: no lines of its own
                    self.error(s, key, where, f"must be {item}")
                continue
            out.append((where, value if isinstance(value, Node) else _node(value, s.line_of(key))))
        return out


def _kind_name(kind: type[Any]) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, kind.__name__
    )


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


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    # normpath, not resolve: "config/../.jitgate" reads better as ".jitgate" in logs, and
    # symlinks are left as the operator wrote them.
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


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
    r = _Reader(str(path), env_keys or {}, os.environ if environ is None else environ)
    base = path.parent
    r.known(
        raw,
        {"listen", "upstream", "redis", "identity", "audit", "forward", "policy", "prefix"}
        | {"state_dir", "grant_max_ttl", "admins", "notifications", "sweep_interval"},
        "",
    )

    s = r.section(raw, "listen", "listen")
    r.known(s, {"host", "port"}, "listen")
    listen = ListenSettings(
        host=r.get(s, "host", str, "127.0.0.1", "listen.host"),
        port=r.get(s, "port", int, 8080, "listen.port"),
    )
    if not 0 <= listen.port <= 65535:
        r.error(s, "port", "listen.port", "must be between 0 and 65535")

    s = r.section(raw, "upstream", "upstream")
    r.known(s, {"url", "host_header", "connect_timeout", "read_timeout", "pool_size"}, "upstream")
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
    )

    s = r.section(raw, "redis", "redis")
    r.known(s, {"url", "timeout", "key_prefix", "max_connections"}, "redis")
    redis_url = r.optional_str(s, "url", None, "redis.url") or None
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        r.error(s, "url", "redis.url", "must start with redis://, rediss:// or unix://")
    redis = RedisSettings(
        url=redis_url,
        timeout=r.positive(s, "timeout", float, 1.0, "redis.timeout"),
        key_prefix=r.get(s, "key_prefix", str, "jit:", "redis.key_prefix"),
        max_connections=r.positive(s, "max_connections", int, 512, "redis.max_connections"),
    )

    prefix = r.get(raw, "prefix", str, "/_jit", "prefix").rstrip("/")
    if not prefix.startswith("/") or len(prefix) < 2 or "//" in prefix:
        r.error(raw, "prefix", "prefix", "must be an absolute path such as /_jit")
    identity = _identity(r, r.section(raw, "identity", "identity"), base, prefix)

    state_dir = _resolve(base, r.get(raw, "state_dir", str, "../.jitgate", "state_dir"))
    audit = _audit(r, r.section(raw, "audit", "audit"), base, state_dir)

    forward = _forward(r, r.section(raw, "forward", "forward"), base, state_dir, upstream_url)

    s = r.section(raw, "admins", "admins")
    r.known(s, {"groups", "users"}, "admins")
    admins = AdminSettings(
        groups=frozenset(r.str_list(s, "groups", (), "admins.groups")),
        users=frozenset(r.str_list(s, "users", (), "admins.users")),
    )

    s = r.section(raw, "policy", "policy")
    r.known(s, {"file", "watch"}, "policy")
    policy_file = _resolve(base, r.get(s, "file", str, "policy.yaml", "policy.file"))
    policy_watch = r.get(s, "watch", bool, True, "policy.watch")

    notifications = _notifications(r, r.section(raw, "notifications", "notifications"))

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
    )
    if r.errors:
        raise ConfigErrors(r.errors)
    return settings


def _identity(r: _Reader, s: Node, base: Path, prefix: str) -> IdentitySettings:
    keys = {
        "bearer", "cookie", "algorithms", "hs_secret", "public_key_files", "issuer", "audience",
        "subject_claim", "groups_claim", "leeway", "max_token_bytes", "dev_key", "dev_key_file",
        "mint_ttl", "cache_size", "issuers", "jwks_min_refetch_interval", "jwks_max_age",
        "email_claim", "groups_delimiter", "group_aliases", "trusted_headers", "oidc", "session",
    }  # fmt: skip
    r.known(s, keys, "identity")
    issuers = _issuers(r, s)
    trusted = None
    if s.get("trusted_headers") is not None:
        node = r.section(s, "trusted_headers", "identity.trusted_headers")
        trusted = _trusted_headers(r, node)
    oidc = None
    if s.get("oidc") is not None:
        oidc = _oidc(r, r.section(s, "oidc", "identity.oidc"), prefix)
    session = None
    if s.get("session") is not None or oidc is not None:
        session = _session(r, s, oidc)
    hs_secret = r.optional_str(s, "hs_secret", None, "identity.hs_secret")
    key_files = tuple(
        _resolve(base, f)
        for f in r.str_list(s, "public_key_files", (), "identity.public_key_files")
    )
    # The local keys (hs_secret, public_key_files) are optional once tokens can come from
    # an issuer's JWKS or an SSO proxy: then `algorithms` defaults to none of them.
    remote = issuers or trusted or oidc
    local_default = ("HS256",) if not remote or hs_secret or key_files else ()
    algorithms = r.str_list(s, "algorithms", local_default, "identity.algorithms")
    for alg in algorithms:
        if alg not in SUPPORTED_ALGORITHMS:
            r.error(
                s, "algorithms", "identity.algorithms",
                f"unsupported algorithm {alg!r} (allowed: {', '.join(SUPPORTED_ALGORITHMS)})",
            )  # fmt: skip
    if not algorithms and not remote:
        r.error(s, "algorithms", "identity.algorithms", "must name at least one algorithm")
    for key_file in key_files:
        if not key_file.is_file():
            r.error(s, "public_key_files", "identity.public_key_files", f"no such file: {key_file}")
    uses_hs = any(a.startswith("HS") for a in algorithms)
    uses_pk = any(not a.startswith("HS") for a in algorithms)
    if uses_hs and not hs_secret:
        r.error(s, "hs_secret", "identity.hs_secret", "is required when algorithms include HS*")
    if hs_secret is not None and len(hs_secret) < 32:
        r.error(s, "hs_secret", "identity.hs_secret", "must be at least 32 characters")
    if uses_pk and not key_files:
        r.error(
            s, "public_key_files", "identity.public_key_files",
            "is required when algorithms include RS*/ES*",
        )  # fmt: skip
    local_issuer = r.optional_str(s, "issuer", None, "identity.issuer")
    if local_issuer and any(i.issuer == local_issuer for i in issuers):
        # A token is routed to its keys by `iss`: one name cannot mean both.
        message = f"{local_issuer!r} is also in identity.issuers; name it in one place only"
        r.error(s, "issuer", "identity.issuer", message)
    dev_key = r.optional_str(s, "dev_key", None, "identity.dev_key")
    dev_key_file = r.optional_str(s, "dev_key_file", None, "identity.dev_key_file")
    bearer = r.get(s, "bearer", bool, True, "identity.bearer")
    cookie = r.optional_str(s, "cookie", "jitgate_token", "identity.cookie") or None
    if not bearer and not cookie and trusted is None and oidc is None:
        r.error(s, "cookie", "identity.cookie", "a cookie name is required when bearer is false")
    defaults = IdentitySettings()
    delimiter = r.optional_str(s, "groups_delimiter", None, "identity.groups_delimiter")
    if delimiter == "":
        r.error(s, "groups_delimiter", "identity.groups_delimiter", "must not be empty")
    return IdentitySettings(
        bearer=bearer,
        cookie=cookie,
        algorithms=algorithms,
        hs_secret=Secret(hs_secret) if hs_secret else None,
        public_key_files=key_files,
        issuer=local_issuer,
        audience=r.optional_str(s, "audience", None, "identity.audience"),
        issuers=issuers,
        jwks_min_refetch_interval=_seconds(
            r, s, "jwks_min_refetch_interval", defaults.jwks_min_refetch_interval, "identity"
        ),
        jwks_max_age=_seconds(r, s, "jwks_max_age", defaults.jwks_max_age, "identity"),
        subject_claim=_claim_path(r, s, "subject_claim", "sub", "identity") or "sub",
        email_claim=_claim_path(r, s, "email_claim", "email", "identity") or "email",
        groups_claim=_claim_path(r, s, "groups_claim", "groups", "identity") or "groups",
        groups_delimiter=delimiter or None,
        group_aliases=_aliases(r, s),
        trusted_headers=trusted,
        oidc=oidc,
        session=session,
        leeway=r.get(s, "leeway", float, 30.0, "identity.leeway"),
        max_token_bytes=r.positive(s, "max_token_bytes", int, 8192, "identity.max_token_bytes"),
        cache_size=r.positive(s, "cache_size", int, 10_000, "identity.cache_size"),
        dev_key=Secret(dev_key) if dev_key else None,
        dev_key_file=_resolve(base, dev_key_file) if dev_key_file else None,
        mint_ttl=r.positive(s, "mint_ttl", float, 3600.0, "identity.mint_ttl"),
    )


def _claim_path(
    r: _Reader, s: Node, key: str, default: ClaimPath | None, at: str
) -> ClaimPath | None:
    where = f"{at}.{key}"
    if key not in s or s[key] is None:
        return default
    value = s[key]
    if isinstance(value, str):
        if "://" in value:
            # A namespaced claim (Auth0 and others) is one key that contains dots.
            message = f"{value!r} would be split at its dots; write it as a list: [{value!r}]"
            r.error(s, key, where, message)
            return default
        if not value or any(not part for part in value.split(".")):
            r.error(s, key, where, f"{value!r} is not a dotted claim path such as realm.roles")
            return default
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    message = "must be a dotted path (realm_access.roles) or a list of keys ([a.b, roles])"
    r.error(s, key, where, message)
    return default


# Authorization-request parameters jitgate sets itself; extra_auth_params may not change them.
_RESERVED_AUTH_PARAMS = frozenset(
    {"client_id", "redirect_uri", "response_type", "scope", "state", "nonce"}
    | {"code_challenge", "code_challenge_method", "response_mode", "request", "request_uri"}
)


def _oidc(r: _Reader, s: Node, prefix: str) -> OidcSettings:
    at = "identity.oidc"
    keys = {"issuer", "client_id", "client_secret", "scopes", "redirect_path", "public_url"}
    keys |= {"post_logout_redirect", "extra_auth_params", "algorithms", "login_timeout"}
    r.known(s, keys, at)
    issuer = r.get(s, "issuer", str, "", f"{at}.issuer")
    if not issuer:
        r.error(s, "issuer", f"{at}.issuer", "is required: the provider's issuer URL")
    else:
        # Discovery, keys and the token endpoint (which gets the client secret) live there.
        _secure_url(r, s, "issuer", f"{at}.issuer")
    client_id = r.get(s, "client_id", str, "", f"{at}.client_id")
    if not client_id:
        r.error(s, "client_id", f"{at}.client_id", "is required")
    secret = s.get("client_secret")
    if secret is not None and not isinstance(secret, str):
        # Never echo the value: it is a secret (an all-digit one parses as a number).
        r.error(s, "client_secret", f"{at}.client_secret", "must be a string (quote it)")
        secret = None
    public_url = r.get(s, "public_url", str, "", f"{at}.public_url").rstrip("/")
    url = _url(public_url) if public_url else None
    if not public_url:
        message = "is required: how browsers reach jitgate (https://jitgate.example.com)"
        r.error(s, "public_url", f"{at}.public_url", message)
    elif url is None or url.query_string or url.fragment or url.path not in ("", "/"):
        message = f"must be an http(s) origin without path or query, got {public_url!r}"
        r.error(s, "public_url", f"{at}.public_url", message)
    elif url.scheme != "https" and not _loopback(url.host):
        # The session cookie and the authorization code would cross the network in clear.
        message = f"must use https (http only on a loopback address), got {public_url!r}"
        r.error(s, "public_url", f"{at}.public_url", message)
    redirect_path = r.get(s, "redirect_path", str, f"{prefix}/oidc/callback", f"{at}.redirect_path")
    if not redirect_path.startswith(prefix + "/") or "//" in redirect_path or "?" in redirect_path:
        message = f"must be a path under the prefix {prefix}/ (it is jitgate's own endpoint)"
        r.error(s, "redirect_path", f"{at}.redirect_path", message)
    scopes = r.str_list(s, "scopes", ("openid", "email", "profile"), f"{at}.scopes")
    if "openid" not in scopes:
        r.error(s, "scopes", f"{at}.scopes", "must include openid (else there is no ID token)")
    if any(not x or " " in x for x in scopes):
        r.error(s, "scopes", f"{at}.scopes", "must be scope names without spaces")
    algorithms = r.str_list(s, "algorithms", ("RS256",), f"{at}.algorithms")
    for alg in algorithms:
        if alg not in JWKS_ALGORITHMS:
            message = f"unsupported algorithm {alg!r} (allowed: {', '.join(JWKS_ALGORITHMS)})"
            r.error(s, "algorithms", f"{at}.algorithms", message)
    post_logout = r.optional_str(s, "post_logout_redirect", None, f"{at}.post_logout_redirect")
    if post_logout is not None and _url(post_logout) is None:
        message = f"must be an http(s) URL registered at the provider, got {post_logout!r}"
        r.error(s, "post_logout_redirect", f"{at}.post_logout_redirect", message)
    extra: list[tuple[str, str]] = []
    raw_extra = r.str_map(
        s, "extra_auth_params", f"{at}.extra_auth_params", "parameter names", "{prompt: login}"
    )
    for key, value in raw_extra.items():
        if key in _RESERVED_AUTH_PARAMS:
            message = f"{key} is set by jitgate and cannot be overridden"
            r.error(s, "extra_auth_params", f"{at}.extra_auth_params", message)
        extra.append((key, value))
    return OidcSettings(
        issuer=issuer,
        client_id=client_id,
        public_url=public_url,
        redirect_path=redirect_path,
        client_secret=Secret(secret) if secret else None,
        scopes=scopes,
        algorithms=algorithms or ("RS256",),
        post_logout_redirect=post_logout,
        extra_auth_params=tuple(extra),
        login_timeout=_seconds(r, s, "login_timeout", 300.0, at),
    )


def _session(r: _Reader, identity: Node, oidc: OidcSettings | None) -> SessionSettings:
    at = "identity.session"
    s = r.section(identity, "session", at)
    r.known(s, {"keys", "cookie", "secure", "max_age", "idle_timeout", "store"}, at)
    raw_keys = s.get("keys")
    keys: list[Secret] = []
    if raw_keys is None:
        message = (
            "is required with identity.oidc: Fernet keys, the first encrypts (make one with "
            '`python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())"`)'
        )
        r.error(identity if "session" not in identity else s, "keys", f"{at}.keys", message)
    elif isinstance(raw_keys, str):
        raw_keys = [raw_keys]
    for i, key in enumerate(raw_keys if isinstance(raw_keys, list) else [None]):
        # Never echo a key: it decrypts every session.
        if not isinstance(key, str) or not _fernet_key(key):
            message = "must be a Fernet key: 32 bytes in url-safe base64 (44 characters)"
            r.error(s, "keys", f"{at}.keys[{i}]", message)
            continue
        keys.append(Secret(key))
    cookie = r.get(s, "cookie", str, "jitgate_session", f"{at}.cookie")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cookie):
        r.error(s, "cookie", f"{at}.cookie", f"{cookie!r} is not a cookie name")
    secure = r.get(s, "secure", bool, True, f"{at}.secure")
    if not secure:
        url = _url(oidc.public_url) if oidc is not None and oidc.public_url else None
        if url is None or url.scheme != "http" or not _loopback(url.host):
            message = (
                "may be false only when identity.oidc.public_url is http on a loopback "
                "address (development and tests)"
            )
            r.error(s, "secure", f"{at}.secure", message)
    elif oidc is not None and oidc.public_url.startswith("http://"):
        # A Secure cookie is never sent back over http: every sign-in would loop.
        message = "must be false when identity.oidc.public_url is http (loopback development)"
        r.error(s, "secure", f"{at}.secure", message)
    store = r.get(s, "store", str, "cookie", f"{at}.store")
    if store not in SESSION_STORES:
        message = f"must be one of {', '.join(SESSION_STORES)}, got {store!r}"
        r.error(s, "store", f"{at}.store", message)
    max_age = _seconds(r, s, "max_age", 8 * 3600.0, at)
    idle = _seconds(r, s, "idle_timeout", 3600.0, at)
    if idle > max_age:
        r.error(s, "idle_timeout", f"{at}.idle_timeout", "must not exceed identity.session.max_age")
    return SessionSettings(
        keys=tuple(keys),
        cookie=cookie,
        secure=secure,
        max_age=max_age,
        idle_timeout=idle,
        store=store,
    )


def _fernet_key(text: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(text.encode("ascii"))) == 32 and len(text) == 44
    except (ValueError, UnicodeEncodeError):
        return False


def _aliases(r: _Reader, s: Node) -> tuple[tuple[str, str], ...]:
    where = "identity.group_aliases"
    raw = s.get("group_aliases")
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in raw.items()
    ):
        r.error(s, "group_aliases", where, 'must map group names to names, e.g. {"okta-eng": eng}')
        return ()
    return tuple((str(k), str(v)) for k, v in raw.items())


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secure_url(r: _Reader, s: Node, key: str, where: str) -> str | None:
    """Return an https URL (or http on a loopback address), else record an error."""
    text = r.optional_str(s, key, None, where)
    if text is None:
        return None
    url = _url(text)
    if url is None:
        r.error(s, key, where, f"must be an http(s) URL with a host, got {text!r}")
    elif url.scheme != "https" and not _loopback(url.host):
        # Keys fetched in clear could be swapped by anyone on the path.
        r.error(s, key, where, f"must use https (http only on a loopback address), got {text!r}")
    return text


def _issuer(r: _Reader, node: Node, where: str, *, url_issuer: bool) -> IssuerSettings | None:
    """Read one {issuer, audience, algorithms, jwks_uri, *_claim} mapping."""
    keys = {"issuer", "audience", "algorithms", "jwks_uri"}
    r.known(node, keys | {"subject_claim", "email_claim", "groups_claim", "header"}, where)
    jwks_uri = _secure_url(r, node, "jwks_uri", f"{where}.jwks_uri")
    issuer = r.get(node, "issuer", str, "", f"{where}.issuer")
    if not issuer:
        r.error(node, "issuer", f"{where}.issuer", "is required")
    elif not url_issuer and jwks_uri is None and "://" not in issuer:
        # Pomerium's iss is a bare host name: nothing to discover its keys from.
        message = "is required when the issuer is not a URL (there is no discovery then)"
        r.error(node, "jwks_uri", f"{where}.jwks_uri", message)
    elif url_issuer or jwks_uri is None:
        # Without a jwks_uri the keys come from discovery under the issuer URL itself.
        _secure_url(r, node, "issuer", f"{where}.issuer")
    audience = r.str_list(node, "audience", (), f"{where}.audience")
    if not audience or not all(audience):
        r.error(node, "audience", f"{where}.audience", "is required: a string or a list")
    algorithms = r.str_list(node, "algorithms", ("RS256",), f"{where}.algorithms")
    for alg in algorithms:
        if alg not in JWKS_ALGORITHMS:
            hint = " (an HMAC secret cannot come from a JWKS)" if alg.startswith("HS") else ""
            message = f"unsupported algorithm {alg!r}{hint} (allowed: {', '.join(JWKS_ALGORITHMS)})"
            r.error(node, "algorithms", f"{where}.algorithms", message)
    if not algorithms:
        r.error(node, "algorithms", f"{where}.algorithms", "must name at least one algorithm")
    if not issuer:
        return None
    return IssuerSettings(
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        jwks_uri=jwks_uri,
        subject_claim=_claim_path(r, node, "subject_claim", None, where),
        email_claim=_claim_path(r, node, "email_claim", None, where),
        groups_claim=_claim_path(r, node, "groups_claim", None, where),
    )


def _issuers(r: _Reader, s: Node) -> tuple[IssuerSettings, ...]:
    out: list[IssuerSettings] = []
    for where, node in r.mappings(
        s, "issuers", "identity.issuers", "{issuer, audience, algorithms, jwks_uri}",
        "a mapping with an issuer and an audience",
    ):  # fmt: skip
        if "header" in node:
            r.error(node, "header", f"{where}.header", "only trusted_headers.assertion has one")
        cfg = _issuer(r, node, where, url_issuer=True)
        if cfg is None:
            continue
        if any(x.issuer == cfg.issuer for x in out):
            r.error(node, "issuer", f"{where}.issuer", f"{cfg.issuer!r} is listed twice")
            continue
        out.append(cfg)
    return tuple(out)


# Header names jitgate reads: RFC 9110 tokens without "_", which the gate refuses.
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^`|~-]+")


def _header_name(r: _Reader, s: Node, key: str, default: str | None, where: str) -> str | None:
    name = r.optional_str(s, key, default, where) if key in s else default
    if name is not None and not _HEADER_NAME.fullmatch(name):
        r.error(s, key, where, f"{name!r} is not a header name (letters, digits and '-')")
        return default
    return name


def _trusted_headers(r: _Reader, s: Node) -> TrustedHeadersSettings:
    at = "identity.trusted_headers"
    r.known(s, {"from", "user", "email", "groups", "groups_delimiter", "assertion"}, at)
    sources: list[IPv4Network | IPv6Network] = []
    for text in r.str_list(s, "from", (), f"{at}.from"):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            r.error(s, "from", f"{at}.from", f"{text!r}: {exc}")
            continue
        if net.prefixlen == 0:
            r.error(s, "from", f"{at}.from", f"{text!r} would trust every client")
            continue
        sources.append(net)
    if not sources and not any(e.field == f"{at}.from" for e in r.errors):
        message = "is required: the addresses of the SSO proxy, e.g. [10.0.0.0/8]"
        r.error(s, "from", f"{at}.from", message)
    user = _header_name(r, s, "user", "X-Forwarded-User", f"{at}.user")
    if user is None:
        r.error(s, "user", f"{at}.user", "is required (the header naming the user)")
    delimiter = r.get(s, "groups_delimiter", str, ",", f"{at}.groups_delimiter")
    if not delimiter:
        r.error(s, "groups_delimiter", f"{at}.groups_delimiter", "must not be empty")
    header, assertion = None, None
    if s.get("assertion") is not None:
        node = r.section(s, "assertion", f"{at}.assertion")
        header = _header_name(r, node, "header", None, f"{at}.assertion.header")
        if header is None:
            message = "is required, e.g. X-Pomerium-Jwt-Assertion"
            r.error(node, "header", f"{at}.assertion.header", message)
        assertion = _issuer(r, node, f"{at}.assertion", url_issuer=False)
    return TrustedHeadersSettings(
        sources=tuple(sources),
        user=user or "X-Forwarded-User",
        email=_header_name(r, s, "email", "X-Forwarded-Email", f"{at}.email"),
        groups=_header_name(r, s, "groups", "X-Forwarded-Groups", f"{at}.groups"),
        groups_delimiter=delimiter or ",",
        assertion_header=header,
        assertion=assertion,
    )


def _forward(
    r: _Reader, s: Node, base: Path, state_dir: Path, upstream_url: URL
) -> ForwardSettings:
    at = "forward"
    r.known(
        s,
        {"pass_authorization", "pass_identity_cookie", "reject_semicolons", "identity_headers"}
        | {"reject_underscore_headers", "assertion", "user_headers", "status_bar"},
        at,
    )
    defaults = ForwardSettings()
    assertion = None
    raw = s.get("assertion")
    if raw is True or isinstance(raw, dict):
        node = r.section(s, "assertion", f"{at}.assertion") if raw is not True else _node({}, 0)
        assertion = _assertion(r, node, base, state_dir, upstream_url)
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
    )


def _assertion(
    r: _Reader, s: Node, base: Path, state_dir: Path, upstream_url: URL
) -> AssertionSettings:
    at = "forward.assertion"
    r.known(s, {"header", "ttl", "key_file", "audience", "issuer"}, at)
    key_text = r.optional_str(s, "key_file", None, f"{at}.key_file")
    key_file = _resolve(base, key_text) if key_text else state_dir / "assertion-key.pem"
    if key_text and not key_file.is_file():
        r.error(s, "key_file", f"{at}.key_file", f"no such file: {key_file}")
    ttl = _seconds(r, s, "ttl", 60.0, at)
    if ttl > ASSERTION_MAX_TTL:
        message = f"must be at most {ASSERTION_MAX_TTL:.0f} seconds: the assertion is a bearer"
        r.error(s, "ttl", f"{at}.ttl", message)
    header = _header_name(r, s, "header", "X-Jitgate-Assertion", f"{at}.header")
    audience = r.get(s, "audience", str, str(upstream_url).rstrip("/"), f"{at}.audience")
    issuer = r.get(s, "issuer", str, "jitgate", f"{at}.issuer")
    for key, value in (("audience", audience), ("issuer", issuer)):
        if not value:
            r.error(s, key, f"{at}.{key}", "must not be empty")
    return AssertionSettings(
        key_file=key_file,
        generate=not key_text,
        audience=audience,
        header=header or "X-Jitgate-Assertion",
        ttl=min(ttl, ASSERTION_MAX_TTL),
        issuer=issuer,
    )


def _audit(r: _Reader, s: Node, base: Path, state_dir: Path) -> AuditSettings:
    at = "audit"
    r.known(
        s,
        {"redis", "file", "stdout", "http", "spool", "strict", "maintain_interval"}
        | {"batch_size", "flush_interval", "queue_max", "hmac_key", "key_id"}
        | {"checkpoint_every", "checkpoint_interval"},
        at,
    )
    hmac_key = s.get("hmac_key")
    if hmac_key is not None and not isinstance(hmac_key, str):
        # Never echo the value: it is a secret (an all-digit key parses as a number).
        r.error(s, "hmac_key", f"{at}.hmac_key", "must be a string (quote it)")
        hmac_key = None
    elif hmac_key is not None and len(hmac_key) < 32:
        r.error(s, "hmac_key", f"{at}.hmac_key", "must be at least 32 characters")
    key_id = r.get(s, "key_id", str, "k1", f"{at}.key_id")
    if not key_id:
        r.error(s, "key_id", f"{at}.key_id", "must not be empty")

    redis: RedisSinkSettings | None = RedisSinkSettings()
    if "redis" in s and s["redis"] is None:
        redis = None
    else:
        node = r.section(s, "redis", f"{at}.redis")
        r.known(node, {"stream", "maxlen", "retention"}, f"{at}.redis")
        stream = r.get(node, "stream", str, "audit", f"{at}.redis.stream")
        if not stream:
            r.error(node, "stream", f"{at}.redis.stream", "must not be empty")
        maxlen = None if "maxlen" in node and node["maxlen"] is None else (
            r.positive(node, "maxlen", int, 1_000_000, f"{at}.redis.maxlen")
        )  # fmt: skip
        redis = RedisSinkSettings(
            stream=stream,
            maxlen=maxlen,
            retention=_seconds(r, node, "retention", None, f"{at}.redis"),
        )

    file: FileSinkSettings | None = None
    raw_file = s.get("file")
    if isinstance(raw_file, str):  # a bare path: no rotation
        file = FileSinkSettings(path=_resolve(base, raw_file))
    elif raw_file is not None:
        node = r.section(s, "file", f"{at}.file")
        r.known(node, {"path", "rotate_bytes", "rotate_daily", "retention", "fsync"}, f"{at}.file")
        path = r.get(node, "path", str, "", f"{at}.file.path")
        if not path:
            r.error(node, "path", f"{at}.file.path", "is required")
        retention = _seconds(r, node, "retention", None, f"{at}.file")
        rotate_bytes = _size(r, node, "rotate_bytes", None, f"{at}.file")
        rotate_daily = r.get(node, "rotate_daily", bool, False, f"{at}.file.rotate_daily")
        if retention is not None and rotate_bytes is None and not rotate_daily:
            message = "needs rotate_bytes or rotate_daily: only rotated files are deleted"
            r.error(node, "retention", f"{at}.file.retention", message)
        file = FileSinkSettings(
            path=_resolve(base, path or "audit.jsonl"),
            rotate_bytes=rotate_bytes,
            rotate_daily=rotate_daily,
            retention=retention,
            fsync=r.get(node, "fsync", bool, True, f"{at}.file.fsync"),
        )

    spool, spool_dir, spool_max = True, state_dir / "audit-spool", 1 << 30
    if "spool" in s and s["spool"] is None:
        spool = False
    else:
        node = r.section(s, "spool", f"{at}.spool")
        r.known(node, {"dir", "max_bytes"}, f"{at}.spool")
        spool_path = r.optional_str(node, "dir", None, f"{at}.spool.dir")
        if spool_path:
            spool_dir = _resolve(base, spool_path)
        spool_max = _size(r, node, "max_bytes", spool_max, f"{at}.spool") or spool_max

    defaults = AuditSettings()
    return AuditSettings(
        redis=redis,
        file=file,
        stdout=r.get(s, "stdout", bool, False, f"{at}.stdout"),
        http=_http_sinks(r, s),
        spool=spool,
        spool_dir=spool_dir,
        spool_max_bytes=spool_max,
        strict=r.get(s, "strict", bool, False, f"{at}.strict"),
        maintain_interval=_seconds(r, s, "maintain_interval", defaults.maintain_interval, at),
        batch_size=r.positive(s, "batch_size", int, 256, f"{at}.batch_size"),
        flush_interval=r.positive(s, "flush_interval", float, 0.25, f"{at}.flush_interval"),
        queue_max=r.positive(s, "queue_max", int, 100_000, f"{at}.queue_max"),
        hmac_key=Secret(hmac_key) if hmac_key else None,
        key_id=key_id,
        checkpoint_every=r.positive(s, "checkpoint_every", int, 1000, f"{at}.checkpoint_every"),
        checkpoint_interval=r.positive(
            s, "checkpoint_interval", float, 60.0, f"{at}.checkpoint_interval"
        ),
    )


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _http_sinks(r: _Reader, s: Node) -> tuple[HttpSinkSettings, ...]:
    sinks: list[HttpSinkSettings] = []
    for where, node in r.mappings(
        s, "http", "audit.http", "{name, url, format, headers, timeout, gzip}",
        "a mapping with a name and a url",
    ):  # fmt: skip
        r.known(node, {"name", "url", "format", "headers", "timeout", "gzip"}, where)
        name = r.get(node, "name", str, "", f"{where}.name")
        if not _ID_RE.fullmatch(name):
            message = "is required: letters, digits, '.', '_' or '-' (it names the metrics)"
            r.error(node, "name", f"{where}.name", message)
        elif any(x.name == name for x in sinks):
            r.error(node, "name", f"{where}.name", f"{name!r} is used twice")
        url = r.get(node, "url", str, "", f"{where}.url")
        if _url(url) is None:
            scheme = url.partition(":")[0] if ":" in url else ""
            r.error(node, "url", f"{where}.url", f"must be an http(s) URL, got scheme {scheme!r}")
        fmt = r.get(node, "format", str, "jsonl", f"{where}.format")
        if fmt not in AUDIT_HTTP_FORMATS:
            message = f"must be one of {', '.join(AUDIT_HTTP_FORMATS)}, got {fmt!r}"
            r.error(node, "format", f"{where}.format", message)
        headers: list[tuple[str, Secret]] = []
        raw_headers = r.str_map(
            node, "headers", f"{where}.headers", "header names", "{Authorization: '${TOKEN}'}"
        )
        for key, value in raw_headers.items():
            # ${VAR} takes the value from the environment: header values are credentials.
            missing = [v for v in _ENV_REF.findall(value) if v not in r.environ]
            if missing:
                message = f"header {key}: environment variable {missing[0]} is not set"
                r.error(node, "headers", f"{where}.headers", message)
                continue
            headers.append((key, Secret(_ENV_REF.sub(lambda m: r.environ[m[1]], value))))
        sinks.append(
            HttpSinkSettings(
                name=name,
                url=Secret(url),
                format=fmt,
                headers=tuple(headers),
                timeout=r.positive(node, "timeout", float, 10.0, f"{where}.timeout"),
                gzip=r.get(node, "gzip", bool, False, f"{where}.gzip"),
            )
        )
    return tuple(sinks)


_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(r: _Reader, s: Node, key: str, default: int | None, at: str) -> int | None:
    where = f"{at}.{key}"
    if key not in s or s[key] is None:
        return default
    try:
        return parse_size(s[key])
    except ValueError as exc:
        r.error(s, key, where, str(exc))
        return default


def parse_size(value: object) -> int:
    """Parse 1048576, '512KB', '100MB' or '1GiB' (1024-based) into bytes; raise ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if m is None or isinstance(value, bool):
            raise ValueError(f"invalid size {value!r} (use e.g. 512KB, 100MB, 1GB)")
        size = int(m[1]) * _SIZE_UNITS[m[2].lower()]
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def _notifications(r: _Reader, s: Node) -> NotificationSettings:
    at = "notifications"
    keys = {"public_url", "expiring_before", "check_interval", "retries", "backoff", "queue_max"}
    r.known(s, keys | {"webhooks"}, at)
    public_url = r.optional_str(s, "public_url", None, f"{at}.public_url") or None
    if public_url is not None:
        url = _url(public_url)
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
        expiring_before=_seconds(r, s, "expiring_before", defaults.expiring_before, at),
        check_interval=_seconds(r, s, "check_interval", defaults.check_interval, at),
        retries=max(0, retries),
        backoff=r.positive(s, "backoff", float, defaults.backoff, f"{at}.backoff"),
        queue_max=r.positive(s, "queue_max", int, defaults.queue_max, f"{at}.queue_max"),
        webhooks=_webhooks(r, s),
    )


def _webhooks(r: _Reader, s: Node) -> tuple[WebhookSettings, ...]:
    hooks = []
    for where, node in r.mappings(
        s, "webhooks", "notifications.webhooks", "{url, format, events, timeout}",
        "a mapping with a url",
    ):  # fmt: skip
        r.known(node, {"url", "format", "events", "timeout"}, where)
        url = r.get(node, "url", str, "", f"{where}.url")
        if not url:
            r.error(node, "url", f"{where}.url", "is required")
        elif _url(url) is None:
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


def _url(text: str) -> URL | None:
    """Return text as an http(s) URL with a host, or None."""
    try:
        url = URL(text)
    except ValueError:
        return None
    return url if url.scheme in ("http", "https") and url.host else None


def _node(mapping: Mapping[Any, Any], line: int) -> Node:
    """Wrap a plain mapping (from an environment variable) so the reader can walk it."""
    node = Node((str(k), v) for k, v in mapping.items())
    node.line, node.key_lines = line, {}
    return node


def _seconds(r: _Reader, s: Node, key: str, default: T, at: str) -> float | T:
    where = f"{at}.{key}"
    if key not in s or s[key] is None:
        return default
    value = s[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        r.error(s, key, where, "must be a duration such as 30s, 5m or 1h, or seconds")
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        r.error(s, key, where, str(exc))
        return default


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | float | int) -> float:
    """Parse '90', '90s', '5m', '2h', '1d' or '1h30m' into seconds; raise ValueError if bad."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        if not value:
            raise ValueError("empty duration")
        try:
            seconds = float(value)
        except ValueError:
            parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)([smhdw]))+", value)
            if parts is None:
                raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 5m, 2h, 1d)") from None
            seconds = sum(
                float(num) * _DURATION[unit]
                for num, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", value)
            )
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, got {text!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return seconds
