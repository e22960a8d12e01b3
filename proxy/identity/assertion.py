"""The identity assertion jitgate sends upstream: a short-lived JWT naming the user.

The upstream should trust the assertion, not headers such as X-Forwarded-User: a JWT
signed by jitgate cannot be forged by a client, and its `aud` ties it to one upstream.
The signing key is an EC P-256 (ES256) or RSA (RS256) PEM private key; without one
configured, an ES256 key is made at the first start and kept in state_dir. The public
key is served as a JWKS at `{prefix}/.well-known/jwks.json`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..settings.identity import AssertionSettings
from .verifier import Identity

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_CACHE_SIZE = 10_000


class AssertionKeyError(Exception):
    """The assertion key file cannot be read or is not a usable key."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_or_create_key(path: Path, *, generate: bool) -> PrivateKey:
    """Return the key in `path`; when `generate`, make an ES256 key there first if missing."""
    if generate and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two processes sharing the state_dir both end up with the file's key.
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
    where = "forward.assertion.key_file"
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AssertionKeyError(f"{where}: {path}: {exc}") from None
    if isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1):
        return loaded
    if isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size >= 2048:
        return loaded
    raise AssertionKeyError(f"{where}: {path}: use an EC P-256 key or an RSA key of 2048+ bits")


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """Return the public half as a JWK with its RFC 7638 thumbprint as the kid."""
    pub = key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        nums = pub.public_numbers()
        members = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64(nums.x.to_bytes(32, "big")),
            "y": _b64(nums.y.to_bytes(32, "big")),
        }
        alg = "ES256"
    else:
        rnums = pub.public_numbers()
        members = {
            "e": _b64(rnums.e.to_bytes((rnums.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64(rnums.n.to_bytes((rnums.n.bit_length() + 7) // 8, "big")),
        }
        alg = "RS256"
    # RFC 7638: the required members in lexical order, no whitespace.
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    kid = _b64(hashlib.sha256(canonical).digest())
    return {**members, "kid": kid, "alg": alg, "use": "sig"}


class AssertionSigner:
    """Sign one assertion per identity, reused while more than half its lifetime is left."""

    def __init__(self, settings: AssertionSettings, key: PrivateKey) -> None:
        self.settings = settings
        self.header = settings.header
        self._key = key
        self.jwk = public_jwk(key)
        self.alg = self.jwk["alg"]
        self._headers = {"kid": self.jwk["kid"], "typ": "JWT"}
        self._cache: OrderedDict[Identity, tuple[str, float]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: AssertionSettings) -> AssertionSigner:
        return cls(settings, load_or_create_key(settings.key_file, generate=settings.generate))

    def jwks(self) -> dict[str, Any]:
        """The key set an upstream verifies assertions with."""
        return {"keys": [self.jwk]}

    def sign(self, ident: Identity, now: float | None = None) -> str:
        """Return an assertion for `ident`, valid for at most `ttl` seconds from its iat."""
        now = time.time() if now is None else now
        ttl = self.settings.ttl
        cached = self._cache.get(ident)
        # A signature per request would cost more than the rest of the gate; an assertion
        # is reused while more than half its lifetime is left, so the upstream never
        # receives one about to expire.
        if cached is not None and now < cached[1] - ttl / 2:
            self._cache.move_to_end(ident)
            return cached[0]
        iat = int(now)
        exp = iat + max(1, int(ttl))
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "sub": ident.subject,
            "groups": list(ident.groups),
            "iat": iat,
            "exp": exp,
            "jti": secrets.token_urlsafe(12),
        }
        if ident.email:
            claims["email"] = ident.email
        token = jwt.encode(claims, self._key, algorithm=self.alg, headers=self._headers)
        self._cache[ident] = (token, float(exp))
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return token
