"""Who is asking: a verified JWT, or the identity an SSO proxy in front of jitgate vouches for.

Tokens (bearer header, else jitgate's cookie) are routed by their `iss`: an issuer listed
in `identity.issuers` is verified with that issuer's JWKS (jwks.py); any other token
with the local keys (`hs_secret`, `public_key_files`), if there are any. Headers set by
an SSO proxy (oauth2-proxy, Pomerium, a cloud IAP) are believed only when the TCP peer
is one of `identity.trusted_headers.from`, never because of X-Forwarded-For.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from multidict import MultiMapping

from ..settings.identity import IdentitySettings, IssuerSettings, TrustedHeadersSettings
from . import claims as claim
from .jwks import IssuerConfig, MultiVerifier
from .keyset import TOKEN_INVALID, TokenError, decode_segment, safe_text


@dataclass(frozen=True)
class Identity:
    subject: str
    groups: tuple[str, ...] = ()
    email: str | None = None


class IdentityError(Exception):
    """The request carries no usable identity; the message is the reason given, and `code`
    the stable word for it (docs/identity.md lists them)."""

    def __init__(self, reason: str, code: str = TOKEN_INVALID) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Found:
    """An identity and where it came from: bearer, session, cookie, headers or assertion."""

    identity: Identity
    source: str

    @property
    def ambient(self) -> bool:
        """Whether a browser sends it by itself, so that another site's request carries it.

        True for jitgate's cookies (token or session) and for an SSO proxy's headers (the
        proxy adds them for any request that carries its own session cookie).
        """
        return self.source != "bearer"


# The identity of a browser session, read only when a decision needs it (session.py).
SessionLookup = Callable[[], Awaitable[Identity | None]]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_MAX_HEADER_VALUE = 4096  # an SSO proxy's user or group list; longer is refused
_BAD_HEADER = "header_invalid"  # an SSO proxy's identity header that cannot be used
_BAD_CLAIM = "claim_invalid"  # a verified token whose claims make no identity


def _load_public_keys(files: tuple[Path, ...]) -> list[PublicKey]:
    keys: list[PublicKey] = []
    for path in files:
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"{path}: only RSA and EC public keys are supported")
        keys.append(key)
    return keys


def _unverified_claims(token: str) -> dict[str, Any]:
    # Read only to route the token to its issuer's keys; nothing here is trusted.
    parts = token.split(".")
    if len(parts) != 3:
        raise IdentityError("malformed token", "token_malformed")
    try:
        return decode_segment(parts[1])
    except TokenError as exc:
        raise IdentityError(exc.reason, exc.code) from None


def _issuer_config(cfg: IssuerSettings) -> IssuerConfig:
    return IssuerConfig(cfg.issuer, cfg.audience, cfg.algorithms, cfg.jwks_uri)


class Verifier:
    """Turn what a request carries into an Identity: tokens, or an SSO proxy's headers."""

    def __init__(
        self, settings: IdentitySettings, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.settings = settings
        self._algorithms = frozenset(settings.algorithms)
        self._hs_secret = settings.hs_secret.reveal() if settings.hs_secret else None
        self._public_keys = _load_public_keys(settings.public_key_files)
        self._local = bool(self._algorithms) and bool(self._hs_secret or self._public_keys)
        self._required = ["exp"]
        if settings.issuer:
            self._required.append("iss")
        if settings.audience:
            self._required.append("aud")
        self._claims = self._claim_map(None)
        self._issuer_claims = {i.issuer: self._claim_map(i) for i in settings.issuers}
        options: dict[str, Any] = {
            "session": session,
            "leeway": settings.leeway,
            "max_token_bytes": settings.max_token_bytes,
            "min_refetch_interval": settings.jwks_min_refetch_interval,
            "max_age": settings.jwks_max_age,
            "https_only": True,
        }
        self._jwks: MultiVerifier | None = None
        if settings.issuers:
            self._jwks = MultiVerifier(map(_issuer_config, settings.issuers), **options)
        self.trusted: TrustedHeadersSettings | None = settings.trusted_headers
        self._assertions: MultiVerifier | None = None
        self._assertion_claims = self._claims
        trusted = self.trusted
        if trusted is not None and trusted.assertion is not None:
            # Its own verifier: an SSO proxy's assertion is never accepted as a bearer token.
            self._assertions = MultiVerifier([_issuer_config(trusted.assertion)], **options)
            self._assertion_claims = self._claim_map(trusted.assertion)
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()

    def _claim_map(self, issuer: IssuerSettings | None) -> claim.ClaimMap:
        s = self.settings
        return claim.ClaimMap(
            subject=(issuer and issuer.subject_claim) or s.subject_claim,
            email=(issuer and issuer.email_claim) or s.email_claim,
            groups=(issuer and issuer.groups_claim) or s.groups_claim,
            delimiter=s.groups_delimiter,
            aliases=s.group_aliases,
        )

    async def warm_up(self) -> dict[str, str]:
        """Fetch every issuer's keys now; return what failed, by issuer (not fatal)."""
        errors: dict[str, str] = {}
        for multi in (self._jwks, self._assertions):
            if multi is not None:
                errors.update(await multi.warm_up())
        return errors

    async def close(self) -> None:
        for multi in (self._jwks, self._assertions):
            if multi is not None:
                await multi.close()

    # --- where the identity comes from ----------------------------------------------------

    def token_from(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """Return the raw token a request carries, bearer header first."""
        return self._bearer(headers) or self._cookie(cookies)

    def _bearer(self, headers: Mapping[str, str]) -> str | None:
        if self.settings.bearer:
            auth = headers.get("Authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return None

    def _cookie(self, cookies: Mapping[str, str]) -> str | None:
        if self.settings.cookie:
            return cookies.get(self.settings.cookie) or None
        return None

    async def identify(
        self,
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        peer: str | None,
        session: SessionLookup | None = None,
    ) -> Found | None:
        """Return who the request is from, None if it says nothing, or raise IdentityError.

        `peer` is the TCP peer's address (request.remote), which decides whether an SSO
        proxy's headers are believed. `session` gives the browser session's identity, if
        OIDC sign-in is on; it comes after a bearer token (API clients keep using those)
        and before the token cookie. A bad or expired session is no session, not an error:
        the browser is sent to sign in again.
        """
        if self.trusted is not None and self.trusts(peer):
            found = await self._from_proxy(self.trusted, headers)
            if found is not None:
                return found
        token = self._bearer(headers)
        if token is not None:
            return Found(await self.verify(token), "bearer")
        if session is not None:
            ident = await session()
            if ident is not None:
                return Found(ident, "session")
        token = self._cookie(cookies)
        if token is not None:
            return Found(await self.verify(token), "cookie")
        return None

    def trusts(self, peer: str | None) -> bool:
        """Whether `peer` is an SSO proxy whose identity headers are believed."""
        if self.trusted is None or not peer:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:  # a Unix socket's empty name, say
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(addr in net for net in self.trusted.sources)

    def no_identity_reason(self, headers: Mapping[str, str], peer: str | None) -> str:
        """Say why a request without credentials has none (for the audit record)."""
        t = self.trusted
        if t is not None and not self.trusts(peer):
            sent = [name for name in t.names() if name in headers]
            if sent:
                return (
                    f"no credentials ({sent[0]} ignored: peer {safe_text(peer)} is not in "
                    "identity.trusted_headers.from)"
                )
        return "no credentials"

    async def _from_proxy(
        self, t: TrustedHeadersSettings, headers: Mapping[str, str]
    ) -> Found | None:
        if t.assertion_header is not None:
            token = _one(headers, t.assertion_header)
            if token is None:
                return None
            ident = await self._cached(b"assertion\0", token, self._verify_assertion)
            return Found(ident, "assertion")
        user = _one(headers, t.user)
        if user is None:
            return None
        user = user.strip()
        if not user or claim.has_control(user):
            raise IdentityError(f"{t.user} must be a user name", _BAD_HEADER)
        email = _one(headers, t.email) if t.email else None
        if email is not None and claim.has_control(email):
            raise IdentityError(f"{t.email} has control characters", _BAD_HEADER)
        raw_groups = _one(headers, t.groups) if t.groups else None
        groups = self._claims.rename(claim.split_groups(raw_groups or "", t.groups_delimiter))
        if any(claim.has_control(g) for g in groups):
            raise IdentityError(f"{t.groups} has control characters", _BAD_HEADER)
        email = email.strip() if email else None
        return Found(Identity(user, groups, email or None), "headers")

    # --- tokens -----------------------------------------------------------------------------

    async def verify(self, token: str) -> Identity:
        """Return a bearer or cookie token's identity or raise IdentityError with the reason."""
        return await self._cached(b"token\0", token, self._verify_token)

    async def _cached(
        self,
        kind: bytes,
        token: str,
        check: Callable[[str], Awaitable[tuple[Identity, float]]],
    ) -> Identity:
        if len(token) > self.settings.max_token_bytes:
            raise IdentityError("token too large", "token_too_large")
        # A verified token is remembered by its hash until it expires, so the signature
        # check (and for JWKS issuers the key lookup) is paid once per token rather than
        # once per request. `kind` keeps an SSO proxy's assertion from ever being taken
        # from the cache as a bearer token, and the other way round.
        digest = hashlib.sha256(kind + token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        now = time.time()
        if cached is not None:
            ident, exp = cached
            if now < exp + self.settings.leeway:
                self._cache.move_to_end(digest)
                return ident
            del self._cache[digest]
            raise IdentityError("token expired", "token_expired")
        ident, exp = await check(token)
        self._cache[digest] = (ident, exp)
        if len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)
        return ident

    async def _verify_token(self, token: str) -> tuple[Identity, float]:
        iss = _unverified_claims(token).get("iss")
        if self._jwks is not None and isinstance(iss, str) and iss in self._jwks.issuers:
            try:
                claims = await self._jwks.verify(token)
            except TokenError as exc:
                raise IdentityError(exc.reason, exc.code) from None
            return self._identity(claims, self._issuer_claims[iss]), float(claims["exp"])
        if not self._local:
            if iss is None:
                raise IdentityError("token names no issuer", "issuer_missing")
            raise IdentityError(f"unknown issuer {safe_text(iss)}", "issuer_unknown")
        if self.settings.issuer and iss is not None and iss != self.settings.issuer:
            # Said first, so the audit record names the issuer rather than its algorithm.
            raise IdentityError(f"unknown issuer {safe_text(iss)}", "issuer_unknown")
        return self._verify_local(token)

    async def _verify_assertion(self, token: str) -> tuple[Identity, float]:
        assert self._assertions is not None and self.trusted is not None
        try:
            claims = await self._assertions.verify(token)
        except TokenError as exc:
            raise IdentityError(
                f"{self.trusted.assertion_header}: {exc.reason}", exc.code
            ) from None
        return self._identity(claims, self._assertion_claims), float(claims["exp"])

    def _verify_local(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise IdentityError("malformed token", "token_malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            code = "alg_none" if str(alg).lower() == "none" else "alg_not_allowed"
            raise IdentityError(f"token algorithm {safe_text(alg, 20)!r} is not allowed", code)
        claims = self._decode(token, alg)
        return self._identity(claims, self._claims), float(claims["exp"])

    def _decode(self, token: str, alg: str) -> dict[str, Any]:
        s = self.settings
        options: Any = {"require": self._required, "verify_aud": bool(s.audience)}
        keys: list[Any]
        if alg.startswith("HS"):
            keys = [self._hs_secret] if self._hs_secret else []
        else:
            want = rsa.RSAPublicKey if alg.startswith(("RS", "PS")) else ec.EllipticCurvePublicKey
            keys = [k for k in self._public_keys if isinstance(k, want)]
        if not keys:
            raise IdentityError(f"no key configured for {alg}", "alg_not_allowed")
        last: jwt.InvalidTokenError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=s.audience,
                    issuer=s.issuer,
                    leeway=s.leeway,
                    options=options,
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc  # try the next key
            except jwt.ExpiredSignatureError:
                raise IdentityError("token expired", "token_expired") from None
            except jwt.ImmatureSignatureError:
                raise IdentityError("token not yet valid (nbf)", "token_not_yet_valid") from None
            except jwt.InvalidAudienceError:
                raise IdentityError("token audience not accepted", "audience_invalid") from None
            except jwt.InvalidIssuerError:
                raise IdentityError("token issuer not accepted", "issuer_unknown") from None
            except jwt.MissingRequiredClaimError as exc:
                raise IdentityError(
                    f"token lacks the {exc.claim!r} claim", "claim_missing"
                ) from None
            except jwt.InvalidTokenError as exc:
                raise IdentityError(f"invalid token: {safe_text(str(exc))}") from None
        raise IdentityError("token signature does not verify", "signature_invalid") from last

    def identity_of(self, claims: Mapping[str, Any]) -> Identity:
        """Map verified claims (an OIDC ID token's) with the identity.*_claim settings."""
        try:
            return self._identity(claims, self._claims)
        except IdentityError:
            raise
        except (TypeError, ValueError) as exc:
            raise IdentityError(f"claims unusable: {safe_text(str(exc))}", _BAD_CLAIM) from None

    def _identity(self, claims: Mapping[str, Any], cmap: claim.ClaimMap) -> Identity:
        subject = claim.lookup(claims, cmap.subject)
        if not isinstance(subject, str) or not subject.strip():
            raise IdentityError(
                f"claim {claim.show(cmap.subject)} must be a non-empty string", _BAD_CLAIM
            )
        email = claim.lookup(claims, cmap.email)
        email = email if isinstance(email, str) and email else None
        groups = cmap.groups_of(claims)
        # Identity values go into upstream headers and audit records: no line breaks there.
        for name, value in ((cmap.subject, subject), (cmap.email, email or "")):
            if claim.has_control(value):
                raise IdentityError(f"claim {claim.show(name)} has control characters", _BAD_CLAIM)
        if any(claim.has_control(g) for g in groups):
            raise IdentityError(
                f"claim {claim.show(cmap.groups)} has control characters", _BAD_CLAIM
            )
        return Identity(subject, groups, email)


def _one(headers: Mapping[str, str], name: str) -> str | None:
    """Return a header's one value; a header sent twice is ambiguous and refused."""
    if isinstance(headers, MultiMapping):
        values = headers.getall(name, [])
        if len(values) > 1:
            raise IdentityError(f"{name} sent {len(values)} times", _BAD_HEADER)
        value = values[0] if values else None
    else:
        value = headers.get(name)
    if value is not None and len(value) > _MAX_HEADER_VALUE:
        raise IdentityError(f"{name} too long", _BAD_HEADER)
    return value


class MintError(Exception):
    """No dev signing key is configured."""


def mint(
    settings: IdentitySettings,
    subject: str,
    *,
    groups: tuple[str, ...] = (),
    email: str | None = None,
    ttl: float | None = None,
    now: float | None = None,
) -> str:
    """Sign a development token with the configured dev key."""
    now = time.time() if now is None else now
    key: Any
    if settings.dev_key is not None:
        alg, key = "HS256", settings.dev_key.reveal()
    elif settings.dev_key_file is not None:
        key = load_pem_private_key(settings.dev_key_file.read_bytes(), password=None)
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    else:
        raise MintError(
            "no dev signing key is configured (identity.dev_key or identity.dev_key_file); "
            "tokens must come from your identity provider"
        )
    claims: dict[str, Any] = {
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + (ttl if ttl is not None else settings.mint_ttl)),
    }
    claim.put(claims, settings.subject_claim, subject)
    if groups:
        claim.put(claims, settings.groups_claim, list(groups))
    if email:
        claim.put(claims, settings.email_claim, email)
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, key, algorithm=alg)
