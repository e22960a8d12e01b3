"""Who is asking: a JWT from the Authorization header or a cookie, verified with pyjwt."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from .settings import IdentitySettings


@dataclass(frozen=True)
class Identity:
    subject: str
    groups: tuple[str, ...] = ()


class IdentityError(Exception):
    """The request carries no usable identity; the message is the reason given."""


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _load_public_keys(files: tuple[Path, ...]) -> list[PublicKey]:
    keys: list[PublicKey] = []
    for path in files:
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"{path}: only RSA and EC public keys are supported")
        keys.append(key)
    return keys


class Verifier:
    """Verify bearer or cookie JWTs against an algorithm allow-list and configured keys."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.settings = settings
        self._algorithms = frozenset(settings.algorithms)
        self._hs_secret = settings.hs_secret.reveal() if settings.hs_secret else None
        self._public_keys = _load_public_keys(settings.public_key_files)
        self._required = ["exp", settings.subject_claim]
        if settings.issuer:
            self._required.append("iss")
        if settings.audience:
            self._required.append("aud")
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()

    def token_from(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """Return the raw token a request carries, bearer header first."""
        if self.settings.bearer:
            auth = headers.get("Authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        if self.settings.cookie:
            cookie = cookies.get(self.settings.cookie)
            if cookie:
                return cookie
        return None

    def verify(self, token: str) -> Identity:
        """Return the token's identity or raise IdentityError with the reason."""
        if len(token) > self.settings.max_token_bytes:
            raise IdentityError("token too large")
        # A verified token is remembered by its hash until it expires, so the signature
        # check is paid once per token rather than once per request.
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        now = time.time()
        if cached is not None:
            ident, exp = cached
            if now < exp + self.settings.leeway:
                self._cache.move_to_end(digest)
                return ident
            del self._cache[digest]
            raise IdentityError("token expired")
        ident, exp = self._verify(token)
        self._cache[digest] = (ident, exp)
        if len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)
        return ident

    def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise IdentityError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise IdentityError(f"token algorithm {alg!r} is not allowed")
        claims = self._decode(token, alg)
        return self._identity(claims), float(claims["exp"])

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
            raise IdentityError(f"no key configured for {alg}")
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
                raise IdentityError("token expired") from None
            except jwt.ImmatureSignatureError:
                raise IdentityError("token not yet valid (nbf)") from None
            except jwt.InvalidAudienceError:
                raise IdentityError("token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise IdentityError("token issuer not accepted") from None
            except jwt.MissingRequiredClaimError as exc:
                raise IdentityError(f"token lacks the {exc.claim!r} claim") from None
            except jwt.InvalidTokenError as exc:
                raise IdentityError(f"invalid token: {exc}") from None
        raise IdentityError("token signature does not verify") from last

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        subject = claims.get(self.settings.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise IdentityError(f"claim {self.settings.subject_claim!r} must be a non-empty string")
        return Identity(subject, _groups(claims.get(self.settings.groups_claim)))


def _groups(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(g for g in value.replace(",", " ").split() if g)
    if isinstance(value, list):
        return tuple(str(g) for g in value if isinstance(g, str) and g)
    return ()


class MintError(Exception):
    """No dev signing key is configured."""


def mint(
    settings: IdentitySettings,
    subject: str,
    *,
    groups: tuple[str, ...] = (),
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
        settings.subject_claim: subject,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + (ttl if ttl is not None else settings.mint_ttl)),
    }
    if groups:
        claims[settings.groups_claim] = list(groups)
    if settings.issuer:
        claims["iss"] = settings.issuer
    if settings.audience:
        claims["aud"] = settings.audience
    return jwt.encode(claims, key, algorithm=alg)
