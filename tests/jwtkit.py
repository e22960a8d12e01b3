"""Real key servers for the identity tests: an issuer whose private key the test holds
(its JWKS served by a real aiohttp server), and an attacker's server that must never
be contacted. Nothing here is a mock: jitgate fetches these keys over TCP.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """`header.payload` (no signature part) from JSON objects, written by hand."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def from_now(**deltas: int) -> dict[str, int]:
    """Time claims (`exp`, `nbf`, `iat`) so many seconds from now. Call it as the token is
    made, not as a table of tokens is built: a slow run must not let an `nbf` pass first."""
    now = int(time.time())
    return {claim: now + delta for claim, delta in deltas.items()}


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


@dataclass
class KeyServer:
    """An issuer on a real HTTP server: GET /jwks publishes `keys`; every request is kept."""

    url: str = ""
    issuer: str = ""  # defaults to url; a bare host name for Pomerium-style assertions
    keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks"

    def add_key(self, kid: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self.keys[kid] = key

    def token(self, aud: str | list[str], *, kid: str | None = None, **over: Any) -> str:
        """A token signed by this issuer; `over` replaces claims (None leaves one out)."""
        kid = kid or next(iter(self.keys))
        key = self.keys[kid]
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer or self.url, "aud": aud, "sub": "mallory"}
        claims.update(iat=now, exp=now + 300)
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(claims, key, alg, headers={"kid": kid})


@contextlib.asynccontextmanager
async def key_server(issuer: str = "") -> AsyncIterator[KeyServer]:
    """Serve a KeyServer's JWKS on 127.0.0.1 until the block ends."""
    ks = KeyServer(issuer=issuer)

    async def any_path(request: web.Request) -> web.Response:
        ks.requests.append(request.path_qs)
        if request.path != "/jwks":
            raise web.HTTPNotFound()
        return web.json_response({"keys": [public_jwk(k, kid) for kid, k in ks.keys.items()]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    ks.url = str(server.make_url("")).rstrip("/")
    try:
        yield ks
    finally:
        await server.close()
