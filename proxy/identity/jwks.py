"""Keys from identity providers' JWKS endpoints, and JWT verification for several issuers.

Each issuer has its own audience and algorithm allow-list and its own key set, fetched
from its `jwks_uri` (configured, or found by OIDC discovery) and cached. A token whose
`kid` is unknown triggers one refetch, and refetches are rate-limited per key set so
that tokens with made-up kids cannot turn jitgate into a flood against the IdP. Keys
only ever come from the configured issuer's key set: the `jku`, `x5u`, `jwk` and `x5c`
header values of a token are never read.

Every refusal is a `TokenError` whose `reason` is short enough for an audit record.
This module does not import the rest of jitgate; `identity.py` wraps it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import yarl
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger("jitgate.jwks")

# The algorithm decides which keys may verify it: (kty, acceptable curves or None).
# Only asymmetric algorithms: a JWKS is public, so an HMAC secret can never come from one.
_ALGORITHMS: dict[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
SUPPORTED_ALGORITHMS = frozenset(_ALGORITHMS)

# Members that only a private JWK has. A published key set carrying them is broken, and
# PyJWT would load a private key from them, so such entries are skipped.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS = 2048

# A kid is only ever a dictionary key here, but it ends up in logs and audit records and
# other software uses kids as file names or database keys. Real IdPs use base64(url),
# hex, UUIDs or short names; anything else (paths, quotes, spaces, SQL) is refused
# before any lookup.
_KID = re.compile(r"[A-Za-z0-9._~+/=:-]{1,128}")

# The header values that name key material. They are listed only to document that
# verification never reads them: a token must not choose the key that verifies it.
IGNORED_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256"})

_MAX_JWKS_BYTES = 512 * 1024
_MAX_DISCOVERY_BYTES = 256 * 1024
_MAX_CACHE_AGE = 24 * 3600.0


class TokenError(Exception):
    """A token, key or key set was refused; `reason` is short enough for an audit record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def secure_url(url: str) -> bool:
    """Whether keys may be fetched from url: https, or http to a loopback address only."""
    try:
        parsed = yarl.URL(url)
    except ValueError:
        return False
    if parsed.scheme == "https" and parsed.host:
        return True
    if parsed.scheme != "http" or parsed.host is None:
        return False
    if parsed.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(parsed.host).is_loopback
    except ValueError:
        return False


def check_kid(kid: object) -> str | None:
    """Return the header's kid if it is a plain key id (or absent), else raise TokenError."""
    if kid is None:
        return None
    if not isinstance(kid, str):
        raise TokenError("kid is not a string")
    if not _KID.fullmatch(kid) or kid.startswith(("/", ".")) or ".." in kid or "//" in kid:
        raise TokenError("kid is not a plain key id")
    return kid


def decode_segment(segment: str) -> dict[str, Any]:
    """Decode one base64url JSON segment of a JWT without verifying anything."""
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # binascii.Error and JSONDecodeError alike
        raise TokenError("malformed token") from None
    if not isinstance(value, dict):
        raise TokenError("malformed token")
    return value


def _unverified_header(token: str) -> dict[str, Any]:
    # Parsed here rather than by PyJWT so that our checks (alg, crit, kid) come first and
    # give their own reasons; PyJWT parses it again when it verifies.
    return decode_segment(token.split(".", 1)[0])


def safe_text(value: object, limit: int = 80) -> str:
    """Return value short and printable: attacker-chosen values (alg, iss) go into reasons."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", if it names one
    jwk: jwt.PyJWK

    def fits(self, alg: str) -> bool:
        kty, curves = _ALGORITHMS[alg]
        if self.alg is not None and self.alg != alg:
            return False
        return self.kty == kty and (curves is None or self.crv in curves)


def _usable(entry: Mapping[str, Any]) -> bool:
    """Whether one JWK of a published set may verify signatures at all."""
    if entry.get("use", "sig") != "sig":
        return False
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return False
    if entry.get("kty") not in ("RSA", "EC", "OKP"):
        return False  # "oct" above all: a shared secret published in a public set
    if _PRIVATE_MEMBERS & entry.keys():
        return False
    alg = entry.get("alg")
    if alg is not None and alg not in _ALGORITHMS:
        return False
    try:
        check_kid(entry.get("kid"))
    except TokenError:
        return False
    return True


def _parse_jwks(data: object) -> list[_Key]:
    """Return the signature keys of a JWKS document; raise TokenError if it has none."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise TokenError("JWKS is not a key set")
    keys: list[_Key] = []
    for entry in data["keys"]:
        if not isinstance(entry, dict) or not _usable(entry):
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue  # an unknown curve or broken numbers: skip that key, keep the others
        if isinstance(jwk.key, rsa.RSAPublicKey) and jwk.key.key_size < _MIN_RSA_BITS:
            continue  # a short RSA modulus can be factored: never trust it
        crv, alg = entry.get("crv"), entry.get("alg")
        keys.append(
            _Key(
                jwk.key_id,
                str(entry["kty"]),
                crv if isinstance(crv, str) else None,
                alg if isinstance(alg, str) else None,
                jwk,
            )
        )
    if not keys:
        raise TokenError("JWKS has no usable signature keys")
    return keys


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, too_large: str) -> bytes:
    # A hostile or broken endpoint must not make us buffer an unbounded body.
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise TokenError(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _cache_max_age(header: str | None) -> float | None:
    if not header:
        return None
    directives = [d.strip().lower() for d in header.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for d in directives:
        name, _, value = d.partition("=")
        if name.strip() == "max-age":
            try:
                return float(int(value.strip().strip('"')))
            except ValueError:
                return None
    return None


class HttpSession:
    """The ClientSession an object was given, or one of its own, made on first use."""

    def __init__(self, given: aiohttp.ClientSession | None) -> None:
        self._given = given
        self._own: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._given is not None:
            return self._given
        if self._own is None:
            self._own = aiohttp.ClientSession()
        return self._own

    async def close(self) -> None:
        """Close the session of its own, if it made one (a given one is its owner's)."""
        if self._own is not None:
            await self._own.close()
            self._own = None


class KeySet:
    """The signature keys of one issuer, fetched from its jwks_uri and cached.

    An unknown kid makes one refetch; fetches are at most one per `min_refetch_interval`
    seconds, and callers that arrive while one is running wait for it instead of
    starting their own. After `max_age` (or the response's Cache-Control max-age) the
    set is refreshed in the background while the cached keys go on answering. When the
    endpoint fails, the keys already known keep working; only unknown kids are refused.
    """

    def __init__(
        self,
        jwks_uri: str,
        *,
        session: aiohttp.ClientSession | None = None,
        min_refetch_interval: float = 30.0,
        max_age: float = 3600.0,
        timeout: float = 5.0,
        max_bytes: int = _MAX_JWKS_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jwks_uri = jwks_uri
        self.min_refetch_interval = min_refetch_interval
        self.max_age = max_age
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.fetches = 0  # HTTP requests made, successful or not
        self.last_error: str | None = None
        self._http = HttpSession(session)
        self._clock = clock
        self._keys: list[_Key] = []
        self._loaded_at: float | None = None
        self._ttl = max_age
        self._last_attempt: float | None = None
        self._inflight: asyncio.Task[bool] | None = None

    @property
    def kids(self) -> tuple[str | None, ...]:
        """The kids of the keys held now, in the key set's order."""
        return tuple(k.kid for k in self._keys)

    @property
    def loaded(self) -> bool:
        return self._loaded_at is not None

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """Return the key that verifies `alg` under `kid`, refetching once if it is unknown."""
        kid = check_kid(kid)
        if alg not in _ALGORITHMS:
            raise TokenError(f"algorithm {safe_text(alg)} not supported")
        fetched = False
        if self._loaded_at is None:
            if self._inflight is None and not self._may_fetch():
                raise TokenError(f"JWKS unavailable: {self.last_error}")
            fetched = await self._fetch_shared()
            if self._loaded_at is None:
                raise TokenError(f"JWKS unavailable: {self.last_error}")
        elif self._stale() and self._inflight is None and self._may_fetch():
            # Refresh behind the request: the cached keys answer meanwhile.
            self._start_fetch()
        key = self._lookup(kid, alg)
        if key is not None:
            return key.jwk
        if not fetched:
            if self._inflight is None and not self._may_fetch():
                raise TokenError(f"unknown kid {kid!r} (refetch rate-limited)")
            fetched = await self._fetch_shared()
            key = self._lookup(kid, alg)
            if key is not None:
                return key.jwk
            if not fetched:
                raise TokenError(f"unknown kid {kid!r}; JWKS refetch failed: {self.last_error}")
        raise TokenError(f"unknown kid {kid!r} after refetch")

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the set now (within the rate limit unless `force`); True if it was replaced."""
        if self._inflight is None and not force and not self._may_fetch():
            return False
        return await self._fetch_shared()

    async def wait_idle(self) -> None:
        """Wait for a fetch in flight (a background refresh, say) to finish, if there is one."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            await asyncio.gather(self._inflight, return_exceptions=True)
            self._inflight = None
        await self._http.close()

    def _lookup(self, kid: str | None, alg: str) -> _Key | None:
        if kid is not None:
            named = [k for k in self._keys if k.kid == kid]
            fitting = [k for k in named if k.fits(alg)]
            if named and not fitting:
                # Refetching cannot make a known key fit another algorithm.
                raise TokenError(f"key {kid!r} does not fit algorithm {alg}")
            return fitting[0] if fitting else None
        # Without a kid the key must be unambiguous: trying every key would let one
        # token probe them all.
        fitting = [k for k in self._keys if k.fits(alg)]
        if len(fitting) > 1:
            raise TokenError(f"token has no kid and {len(fitting)} keys fit {alg}")
        return fitting[0] if fitting else None

    def _stale(self) -> bool:
        return self._loaded_at is None or self._clock() - self._loaded_at >= self._ttl

    def _may_fetch(self) -> bool:
        last = self._last_attempt
        return last is None or self._clock() - last >= self.min_refetch_interval

    def _start_fetch(self) -> asyncio.Task[bool]:
        if self._inflight is None:
            # Marked before the request goes out, so every caller from now on is limited.
            self._last_attempt = self._clock()
            task = asyncio.create_task(self._fetch(), name=f"jwks-fetch {self.jwks_uri}")
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch_shared(self) -> bool:
        # shield: one caller giving up (its request was cancelled) must not cancel the
        # fetch the others are waiting for.
        return await asyncio.shield(self._start_fetch())

    async def _fetch(self) -> bool:
        self.fetches += 1
        try:
            session = self._http.get()
            # No redirects: the key set comes from the configured (or discovered) URL only.
            async with session.get(
                self.jwks_uri,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
                headers={"Accept": "application/jwk-set+json, application/json"},
            ) as resp:
                if resp.status != 200:
                    raise TokenError(f"JWKS endpoint answered HTTP {resp.status}")
                body = await _read_limited(resp, self.max_bytes, "JWKS response too large")
                cache_control = resp.headers.get("Cache-Control")
            try:
                keys = _parse_jwks(json.loads(body))
            except ValueError:
                raise TokenError("JWKS is not JSON") from None
        except TokenError as exc:
            return self._failed(exc.reason)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._failed(f"JWKS fetch failed: {type(exc).__name__}")
        self._keys = keys
        self._loaded_at = self._clock()
        advertised = _cache_max_age(cache_control)
        ttl = self.max_age if advertised is None else advertised
        # Never refetch faster than the rate limit, never trust a key set for days.
        self._ttl = min(max(ttl, self.min_refetch_interval), _MAX_CACHE_AGE)
        self.last_error = None
        log.info("JWKS %s: %d keys (%s)", self.jwks_uri, len(keys), ", ".join(map(str, self.kids)))
        return True

    def _failed(self, reason: str) -> bool:
        self.last_error = reason
        log.warning("JWKS %s: %s; keeping %d known keys", self.jwks_uri, reason, len(self._keys))
        return False


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted issuer: tokens must carry its `iss`, one of its audiences and an allowed alg."""

    issuer: str
    audience: str | tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256",)
    jwks_uri: str | None = None  # None: taken from the issuer's discovery document

    def __post_init__(self) -> None:
        # Discovery needs an issuer URL. With a jwks_uri the issuer is only compared with
        # `iss`, which some proxies set to a bare host name (Pomerium's assertions).
        if not self.issuer or (
            self.jwks_uri is None and not self.issuer.startswith(("https://", "http://"))
        ):
            raise ValueError(f"issuer {self.issuer!r} must be an http(s) URL")
        if isinstance(self.audience, list):
            object.__setattr__(self, "audience", tuple(self.audience))
        if not self.audiences or not all(a for a in self.audiences):
            raise ValueError(f"issuer {self.issuer}: audience must be a non-empty string")
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        if not self.algorithms:
            raise ValueError(f"issuer {self.issuer}: name at least one algorithm")
        for alg in self.algorithms:
            if alg.lower() == "none":
                raise ValueError(f"issuer {self.issuer}: algorithm none is never allowed")
            if alg.upper().startswith("HS"):
                raise ValueError(
                    f"issuer {self.issuer}: {alg} needs a shared secret; "
                    "keys from a JWKS allow only asymmetric algorithms"
                )
            if alg not in _ALGORITHMS:
                supported = ", ".join(sorted(_ALGORITHMS))
                raise ValueError(f"issuer {self.issuer}: algorithm {alg} (supported: {supported})")
        if self.jwks_uri is not None and not self.jwks_uri.startswith(("https://", "http://")):
            raise ValueError(f"issuer {self.issuer}: jwks_uri must be an http(s) URL")

    @property
    def audiences(self) -> tuple[str, ...]:
        return (self.audience,) if isinstance(self.audience, str) else self.audience


async def discover(
    issuer: str, session: aiohttp.ClientSession, *, request_timeout: float = 5.0
) -> dict[str, Any]:
    """Return the issuer's OpenID discovery document after checking its `issuer` and `jwks_uri`."""
    # OpenID Connect Discovery 1.0 section 4: strip one trailing slash, append the path.
    url = issuer.removesuffix("/") + "/.well-known/openid-configuration"
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=request_timeout),
            allow_redirects=False,
            headers={"Accept": "application/json"},
        ) as resp:
            if resp.status != 200:
                raise TokenError(f"discovery for {issuer}: HTTP {resp.status}")
            too_large = f"discovery for {issuer}: document too large"
            body = await _read_limited(resp, _MAX_DISCOVERY_BYTES, too_large)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TokenError(f"discovery for {issuer} failed: {type(exc).__name__}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise TokenError(f"discovery for {issuer}: not JSON") from None
    if not isinstance(doc, dict):
        raise TokenError(f"discovery for {issuer}: not a JSON object")
    # Section 4.3: the document must name exactly the issuer it was fetched for, or a
    # provider could pass off another one's tokens.
    if doc.get("issuer") != issuer:
        raise TokenError(
            f"discovery for {issuer}: document names issuer {safe_text(doc.get('issuer'))}"
        )
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
        raise TokenError(f"discovery for {issuer}: no usable jwks_uri")
    return doc


class MultiVerifier:
    """Verify JWTs from several issuers, each with its own key set, audience and algorithms."""

    def __init__(
        self,
        issuers: Iterable[IssuerConfig],
        *,
        session: aiohttp.ClientSession | None = None,
        leeway: float = 30.0,
        max_token_bytes: int = 8192,
        required_claims: tuple[str, ...] = ("exp", "iat", "iss", "aud"),
        min_refetch_interval: float = 30.0,
        max_age: float = 3600.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        https_only: bool = False,
    ) -> None:
        self.https_only = https_only  # key sets only over https (or http to loopback)
        self.issuers: dict[str, IssuerConfig] = {}
        for cfg in issuers:
            if cfg.issuer in self.issuers:
                raise ValueError(f"issuer {cfg.issuer} is listed twice")
            if https_only and cfg.jwks_uri is not None and not secure_url(cfg.jwks_uri):
                raise ValueError(f"issuer {cfg.issuer}: jwks_uri must use https")
            if https_only and cfg.jwks_uri is None and not secure_url(cfg.issuer):
                raise ValueError(f"issuer {cfg.issuer}: discovery must use https")
            self.issuers[cfg.issuer] = cfg
        if not self.issuers:
            raise ValueError("name at least one issuer")
        self.leeway = leeway
        self.max_token_bytes = max_token_bytes
        self.required_claims = list(required_claims)
        self.timeout = timeout
        self._session = session  # given to every key set too
        self._http = HttpSession(session)
        self._clock = clock
        self._keyset_options: dict[str, Any] = {
            "min_refetch_interval": min_refetch_interval,
            "max_age": max_age,
            "timeout": timeout,
            "clock": clock,
        }
        self.key_sets: dict[str, KeySet] = {}
        self.documents: dict[str, dict[str, Any]] = {}  # discovery documents, by issuer
        self._discovery_failed: dict[str, tuple[float, str]] = {}
        self._discovery_locks: dict[str, asyncio.Lock] = {}
        for cfg in self.issuers.values():
            if cfg.jwks_uri is not None:
                self.key_sets[cfg.issuer] = self._new_key_set(cfg.jwks_uri)

    async def warm_up(self) -> dict[str, str]:
        """Discover and fetch every issuer's keys now; return the errors by issuer.

        A failure is not fatal: tokens of that issuer are refused until its keys load.
        """
        errors: dict[str, str] = {}
        for cfg in self.issuers.values():
            try:
                keys = await self._key_set(cfg)
                if not keys.loaded:
                    await keys.refresh()
                if not keys.loaded:
                    errors[cfg.issuer] = keys.last_error or "JWKS not loaded"
            except TokenError as exc:
                errors[cfg.issuer] = exc.reason
        return errors

    async def verify(self, token: str) -> dict[str, Any]:
        """Return the token's claims, or raise TokenError with the reason it is refused."""
        if len(token) > self.max_token_bytes:
            raise TokenError("token too large")
        if not token.isascii() or token.count(".") != 2:
            raise TokenError("malformed token")  # JWE (5 parts) and garbage alike
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise TokenError("token names no algorithm")
        if alg.lower() == "none":
            raise TokenError("algorithm none not allowed")
        if "crit" in header:
            # We implement no JWS extension, so any critical one must fail (RFC 7515 4.1.11).
            raise TokenError("critical header extensions not supported")
        kid = check_kid(header.get("kid"))
        # jku, x5u, jwk and x5c are deliberately never looked at (see IGNORED_HEADERS).
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise TokenError("malformed token") from None
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise TokenError("token names no issuer")
        cfg = self.issuers.get(iss)
        if cfg is None:
            raise TokenError(f"unknown issuer {safe_text(iss)}")
        if alg not in cfg.algorithms:
            raise TokenError(f"algorithm {safe_text(alg, 20)} not allowed for issuer {iss}")
        keys = await self._key_set(cfg)
        jwk = await keys.key_for(kid, alg)
        return self._decode(token, jwk, alg, cfg)

    async def close(self) -> None:
        for keys in self.key_sets.values():
            await keys.close()
        await self._http.close()

    async def __aenter__(self) -> MultiVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _decode(self, token: str, jwk: jwt.PyJWK, alg: str, cfg: IssuerConfig) -> dict[str, Any]:
        try:
            # The raw public key, not the PyJWK: PyJWK carries one algorithm of its own,
            # and the algorithm must be the one this issuer's allow-list let through.
            claims: dict[str, Any] = jwt.decode(
                token,
                jwk.key,
                algorithms=[alg],
                audience=list(cfg.audiences),
                issuer=cfg.issuer,
                leeway=self.leeway,
                options={"require": self.required_claims, "verify_signature": True},
            )
        except jwt.InvalidSignatureError:
            raise TokenError("signature does not verify") from None
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.ImmatureSignatureError as exc:
            which = "iat" if "iat" in str(exc) else "nbf"
            raise TokenError(f"token not yet valid ({which})") from None
        except jwt.InvalidAudienceError:
            raise TokenError(f"audience not accepted for issuer {cfg.issuer}") from None
        except jwt.InvalidIssuerError:
            raise TokenError("issuer does not match") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidKeyError:
            raise TokenError(f"key does not fit algorithm {alg}") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token: {safe_text(str(exc))}") from None
        return claims

    async def _key_set(self, cfg: IssuerConfig) -> KeySet:
        keys = self.key_sets.get(cfg.issuer)
        if keys is not None:
            return keys
        lock = self._discovery_locks.setdefault(cfg.issuer, asyncio.Lock())
        async with lock:  # one discovery per issuer, however many tokens arrive at once
            keys = self.key_sets.get(cfg.issuer)
            if keys is not None:
                return keys
            failed = self._discovery_failed.get(cfg.issuer)
            interval = self._keyset_options["min_refetch_interval"]
            if failed is not None and self._clock() - failed[0] < interval:
                raise TokenError(failed[1])
            try:
                doc = await discover(cfg.issuer, self._http.get(), request_timeout=self.timeout)
            except TokenError as exc:
                self._discovery_failed[cfg.issuer] = (self._clock(), exc.reason)
                log.warning("%s", exc.reason)
                raise
            jwks_uri = str(doc["jwks_uri"])
            if self.https_only and not secure_url(jwks_uri):
                # A discovery document could otherwise send us to fetch keys in clear.
                reason = f"discovery for {cfg.issuer}: jwks_uri {safe_text(jwks_uri)} is not https"
                self._discovery_failed[cfg.issuer] = (self._clock(), reason)
                log.warning("%s", reason)
                raise TokenError(reason)
            self._discovery_failed.pop(cfg.issuer, None)
            self.documents[cfg.issuer] = doc  # the login flow needs its endpoints too
            keys = self._new_key_set(jwks_uri)
            self.key_sets[cfg.issuer] = keys
            return keys

    def _new_key_set(self, jwks_uri: str) -> KeySet:
        return KeySet(jwks_uri, session=self._session, **self._keyset_options)
