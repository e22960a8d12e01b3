"""One issuer's key set: its JWKS fetched, checked and cached, and the checks every token
meets before a key is looked up.

A key set refetches when a token names a `kid` it does not hold, at most once per
`min_refetch_interval`, and concurrent requests share one fetch. Only public keys of the
supported asymmetric algorithms are kept; a key with private members, or an RSA key
under 2048 bits, is dropped. Every refusal is a `TokenError`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import yarl
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger("jitgate.jwks")

# The algorithm decides which keys may verify it: (kty, acceptable curves or None).
# Only asymmetric algorithms: a JWKS is public, so an HMAC secret can never come from one.
ALGORITHMS: dict[str, tuple[str, frozenset[str] | None]] = {
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
SUPPORTED_ALGORITHMS = frozenset(ALGORITHMS)

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
_MAX_CACHE_AGE = 24 * 3600.0


# The code of a refusal no more precise code names.
TOKEN_INVALID = "token_invalid"

# Why a request has no identity, as stable words for audit records and refusals; the
# reasons next to them are for people. docs/identity.md explains each one.
REASON_CODES = frozenset(
    {
        "no_credentials",  # nothing to identify the request by
        "token_malformed",  # not a JWS in compact form (a JWE, a nested JWT, garbage)
        "token_too_large",
        TOKEN_INVALID,  # refused by the JWT library for another reason
        "token_expired",
        "token_not_yet_valid",  # nbf or iat in the future
        "alg_missing",
        "alg_none",
        "alg_not_allowed",  # not in the issuer's list (HS/RS confusion among others)
        "crit_unsupported",
        "kid_invalid",  # not a plain key id (path or SQL tricks)
        "kid_unknown",
        "kid_missing",  # no kid, and several keys would fit
        "key_mismatch",  # the named key is of another type than the algorithm
        "issuer_missing",
        "issuer_unknown",
        "audience_invalid",
        "signature_invalid",
        "claim_missing",
        "claim_invalid",  # the verified claims make no usable identity
        "header_invalid",  # an SSO proxy's identity header is unusable
        "jwks_unavailable",  # the issuer's keys cannot be had now
    }
)


class TokenError(Exception):
    """A token, key or key set was refused; `reason` is short enough for an audit record,
    and `code` is the stable word for it (docs/identity.md lists them)."""

    def __init__(self, reason: str, code: str = TOKEN_INVALID) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


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
        raise TokenError("kid is not a string", "kid_invalid")
    if not _KID.fullmatch(kid) or kid.startswith(("/", ".")) or ".." in kid or "//" in kid:
        raise TokenError("kid is not a plain key id", "kid_invalid")
    return kid


def decode_segment(segment: str) -> dict[str, Any]:
    """Decode one base64url JSON segment of a JWT without verifying anything."""
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # binascii.Error and JSONDecodeError alike
        raise TokenError("malformed token", "token_malformed") from None
    if not isinstance(value, dict):
        raise TokenError("malformed token", "token_malformed")
    return value


def unverified_header(token: str) -> dict[str, Any]:
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
        kty, curves = ALGORITHMS[alg]
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
    if alg is not None and alg not in ALGORITHMS:
        return False
    try:
        check_kid(entry.get("kid"))
    except TokenError:
        return False
    return True


def _parse_jwks(data: object) -> list[_Key]:
    """Return the signature keys of a JWKS document; raise TokenError if it has none."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise TokenError("JWKS is not a key set", "jwks_unavailable")
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
        raise TokenError("JWKS has no usable signature keys", "jwks_unavailable")
    return keys


async def read_limited(resp: aiohttp.ClientResponse, limit: int, too_large: str) -> bytes:
    # A hostile or broken endpoint must not make us buffer an unbounded body.
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise TokenError(too_large, "jwks_unavailable")
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
        if alg not in ALGORITHMS:
            raise TokenError(f"algorithm {safe_text(alg)} not supported", "alg_not_allowed")
        fetched = False
        if self._loaded_at is None:
            if self._inflight is None and not self._may_fetch():
                raise TokenError(f"JWKS unavailable: {self.last_error}", "jwks_unavailable")
            fetched = await self._fetch_shared()
            if self._loaded_at is None:
                raise TokenError(f"JWKS unavailable: {self.last_error}", "jwks_unavailable")
        elif self._stale() and self._inflight is None and self._may_fetch():
            # Refresh behind the request: the cached keys answer meanwhile.
            self._start_fetch()
        key = self._lookup(kid, alg)
        if key is not None:
            return key.jwk
        if not fetched:
            if self._inflight is None and not self._may_fetch():
                raise TokenError(f"unknown kid {kid!r} (refetch rate-limited)", "kid_unknown")
            fetched = await self._fetch_shared()
            key = self._lookup(kid, alg)
            if key is not None:
                return key.jwk
            if not fetched:
                raise TokenError(
                    f"unknown kid {kid!r}; JWKS refetch failed: {self.last_error}",
                    "jwks_unavailable",
                )
        raise TokenError(f"unknown kid {kid!r} after refetch", "kid_unknown")

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
                raise TokenError(f"key {kid!r} does not fit algorithm {alg}", "key_mismatch")
            return fitting[0] if fitting else None
        # Without a kid the key must be unambiguous: trying every key would let one
        # token probe them all.
        fitting = [k for k in self._keys if k.fits(alg)]
        if len(fitting) > 1:
            raise TokenError(f"token has no kid and {len(fitting)} keys fit {alg}", "kid_missing")
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
                    raise TokenError(
                        f"JWKS endpoint answered HTTP {resp.status}", "jwks_unavailable"
                    )
                body = await read_limited(resp, self.max_bytes, "JWKS response too large")
                cache_control = resp.headers.get("Cache-Control")
            try:
                keys = _parse_jwks(json.loads(body))
            except ValueError:
                raise TokenError("JWKS is not JSON", "jwks_unavailable") from None
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
