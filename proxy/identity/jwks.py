"""Keys from identity providers' JWKS endpoints, and JWT verification for several issuers.

Each issuer has its own audience and algorithm allow-list and its own key set, fetched
from its `jwks_uri` (configured, or found by OIDC discovery) and cached. A token whose
`kid` is unknown triggers one refetch, and refetches are rate-limited per key set so
that tokens with made-up kids cannot turn jitgate into a flood against the IdP. Keys
only ever come from the configured issuer's key set: the `jku`, `x5u`, `jwk` and `x5c`
header values of a token are never read.

Every refusal is a `TokenError` whose `reason` is short enough for an audit record.
This module does not import the rest of jitgate; verifier.py wraps it, keyset.py holds
one issuer's keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from .keyset import (
    ALGORITHMS,
    HttpSession,
    KeySet,
    TokenError,
    check_kid,
    read_limited,
    safe_text,
    secure_url,
    unverified_header,
)

log = logging.getLogger("jitgate.jwks")

_MAX_DISCOVERY_BYTES = 256 * 1024
_NO_KEYS = "jwks_unavailable"  # the code of every failure to get an issuer's keys


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
            if alg not in ALGORITHMS:
                supported = ", ".join(sorted(ALGORITHMS))
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
                raise TokenError(f"discovery for {issuer}: HTTP {resp.status}", _NO_KEYS)
            too_large = f"discovery for {issuer}: document too large"
            body = await read_limited(resp, _MAX_DISCOVERY_BYTES, too_large)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TokenError(f"discovery for {issuer} failed: {type(exc).__name__}", _NO_KEYS) from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise TokenError(f"discovery for {issuer}: not JSON", _NO_KEYS) from None
    if not isinstance(doc, dict):
        raise TokenError(f"discovery for {issuer}: not a JSON object", _NO_KEYS)
    # Section 4.3: the document must name exactly the issuer it was fetched for, or a
    # provider could pass off another one's tokens.
    if doc.get("issuer") != issuer:
        raise TokenError(
            f"discovery for {issuer}: document names issuer {safe_text(doc.get('issuer'))}",
            _NO_KEYS,
        )
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
        raise TokenError(f"discovery for {issuer}: no usable jwks_uri", _NO_KEYS)
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
            raise TokenError("token too large", "token_too_large")
        if not token.isascii() or token.count(".") != 2:  # JWE (5 parts) and garbage alike
            raise TokenError("malformed token", "token_malformed")
        header = unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise TokenError("token names no algorithm", "alg_missing")
        if alg.lower() == "none":
            raise TokenError("algorithm none not allowed", "alg_none")
        if "crit" in header:
            # We implement no JWS extension, so any critical one must fail (RFC 7515 4.1.11).
            raise TokenError("critical header extensions not supported", "crit_unsupported")
        kid = check_kid(header.get("kid"))
        # jku, x5u, jwk and x5c are deliberately never looked at (see IGNORED_HEADERS).
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise TokenError("malformed token", "token_malformed") from None
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise TokenError("token names no issuer", "issuer_missing")
        cfg = self.issuers.get(iss)
        if cfg is None:
            raise TokenError(f"unknown issuer {safe_text(iss)}", "issuer_unknown")
        if alg not in cfg.algorithms:
            raise TokenError(
                f"algorithm {safe_text(alg, 20)} not allowed for issuer {iss}", "alg_not_allowed"
            )
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
            raise TokenError("signature does not verify", "signature_invalid") from None
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired", "token_expired") from None
        except jwt.ImmatureSignatureError as exc:
            which = "iat" if "iat" in str(exc) else "nbf"
            raise TokenError(f"token not yet valid ({which})", "token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise TokenError(
                f"audience not accepted for issuer {cfg.issuer}", "audience_invalid"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenError("issuer does not match", "issuer_unknown") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the {exc.claim!r} claim", "claim_missing") from None
        except jwt.InvalidKeyError:
            raise TokenError(f"key does not fit algorithm {alg}", "key_mismatch") from None
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
                raise TokenError(failed[1], _NO_KEYS)
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
                raise TokenError(reason, _NO_KEYS)
            self._discovery_failed.pop(cfg.issuer, None)
            self.documents[cfg.issuer] = doc  # the login flow needs its endpoints too
            keys = self._new_key_set(jwks_uri)
            self.key_sets[cfg.issuer] = keys
            return keys

    def _new_key_set(self, jwks_uri: str) -> KeySet:
        return KeySet(jwks_uri, session=self._session, **self._keyset_options)
