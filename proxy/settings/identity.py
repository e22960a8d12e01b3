"""Identity settings: the `identity` section and the identity assertion sent upstream.

Local keys, JWKS issuers, SSO trusted headers, OIDC sign-in and its browser session
(`identity.*`), and `forward.assertion`, the signed JWT naming the user that jitgate
sends upstream. Read with the reading layer of read.py.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from yarl import URL

from .read import Reader, Secret, http_url, resolve, seconds
from .yamlsrc import Node

SUPPORTED_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384")
# Keys from a JWKS are public, so only asymmetric algorithms (identity/jwks.py checks the same).
JWKS_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
ASSERTION_MAX_TTL = 300.0


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
class AssertionSettings:
    """A signed JWT naming the user, sent upstream with every request that has one."""

    key_file: Path  # PEM private key (EC P-256: ES256, RSA: RS256)
    generate: bool  # key_file was not configured: made at start if missing (in state_dir)
    audience: str  # default: upstream.url
    header: str = "X-Jitgate-Assertion"
    ttl: float = 60.0  # at most 300
    issuer: str = "jitgate"


def identity(r: Reader, s: Node, base: Path, prefix: str) -> IdentitySettings:
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
        resolve(base, f) for f in r.str_list(s, "public_key_files", (), "identity.public_key_files")
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
        jwks_min_refetch_interval=seconds(
            r, s, "jwks_min_refetch_interval", defaults.jwks_min_refetch_interval, "identity"
        ),
        jwks_max_age=seconds(r, s, "jwks_max_age", defaults.jwks_max_age, "identity"),
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
        dev_key_file=resolve(base, dev_key_file) if dev_key_file else None,
        mint_ttl=r.positive(s, "mint_ttl", float, 3600.0, "identity.mint_ttl"),
    )


def _claim_path(
    r: Reader, s: Node, key: str, default: ClaimPath | None, at: str
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


def _oidc(r: Reader, s: Node, prefix: str) -> OidcSettings:
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
    url = http_url(public_url) if public_url else None
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
    if post_logout is not None and http_url(post_logout) is None:
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
        login_timeout=seconds(r, s, "login_timeout", 300.0, at),
    )


def _session(r: Reader, identity: Node, oidc: OidcSettings | None) -> SessionSettings:
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
        url = http_url(oidc.public_url) if oidc is not None and oidc.public_url else None
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
    max_age = seconds(r, s, "max_age", 8 * 3600.0, at)
    idle = seconds(r, s, "idle_timeout", 3600.0, at)
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


def _aliases(r: Reader, s: Node) -> tuple[tuple[str, str], ...]:
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


def _secure_url(r: Reader, s: Node, key: str, where: str) -> str | None:
    """Return an https URL (or http on a loopback address), else record an error."""
    text = r.optional_str(s, key, None, where)
    if text is None:
        return None
    url = http_url(text)
    if url is None:
        r.error(s, key, where, f"must be an http(s) URL with a host, got {text!r}")
    elif url.scheme != "https" and not _loopback(url.host):
        # Keys fetched in clear could be swapped by anyone on the path.
        r.error(s, key, where, f"must use https (http only on a loopback address), got {text!r}")
    return text


def _issuer(r: Reader, node: Node, where: str, *, url_issuer: bool) -> IssuerSettings | None:
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


def _issuers(r: Reader, s: Node) -> tuple[IssuerSettings, ...]:
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


def _header_name(r: Reader, s: Node, key: str, default: str | None, where: str) -> str | None:
    name = r.optional_str(s, key, default, where) if key in s else default
    if name is not None and not _HEADER_NAME.fullmatch(name):
        r.error(s, key, where, f"{name!r} is not a header name (letters, digits and '-')")
        return default
    return name


def _trusted_headers(r: Reader, s: Node) -> TrustedHeadersSettings:
    at = "identity.trusted_headers"
    r.known(s, {"from", "user", "email", "groups", "groups_delimiter", "assertion"}, at)
    sources = r.networks(s, "from", f"{at}.from")
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


def assertion(
    r: Reader, s: Node, base: Path, state_dir: Path, upstream_url: URL
) -> AssertionSettings:
    at = "forward.assertion"
    r.known(s, {"header", "ttl", "key_file", "audience", "issuer"}, at)
    key_text = r.optional_str(s, "key_file", None, f"{at}.key_file")
    key_file = resolve(base, key_text) if key_text else state_dir / "assertion-key.pem"
    if key_text and not key_file.is_file():
        r.error(s, "key_file", f"{at}.key_file", f"no such file: {key_file}")
    ttl = seconds(r, s, "ttl", 60.0, at)
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
