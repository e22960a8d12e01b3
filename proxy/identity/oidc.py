"""OpenID Connect sign-in for browsers: authorization code with PKCE (S256).

The provider's endpoints come from its discovery document and the ID token is verified
with its JWKS, both through identity/jwks.py (the same code, caching and rate limits as for
bearer tokens): `iss`, `aud` (the client id), `exp` and `iat` there; `nonce`, `azp` and
`at_hash` here.

A login in flight (state, nonce, PKCE verifier, the page to return to, its deadline)
is kept in a short-lived cookie encrypted with the session keys, so it is bound to the
browser that started it and no server state is needed. A callback consumes its state:
the cookie is rewritten without it, and the provider refuses a code used twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from cryptography.fernet import InvalidToken, MultiFernet

from ..settings.identity import OidcSettings
from .jwks import IssuerConfig, MultiVerifier
from .keyset import TokenError, secure_url

log = logging.getLogger("jitgate.oidc")

_MAX_PENDING = 4  # logins in flight per browser (several tabs); the oldest is dropped
_MAX_TOKEN_RESPONSE = 64 * 1024


class LoginError(Exception):
    """A sign-in was refused or could not be completed; the message says why."""


@dataclass(frozen=True)
class Pending:
    """One login in flight, as the state cookie holds it."""

    state: str
    nonce: str
    verifier: str  # the PKCE code_verifier
    next: str  # a checked same-origin path
    expires: float


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _at_hash(access_token: str, alg: str) -> str:
    # OIDC Core 3.1.3.6: the left half of the hash the ID token's algorithm uses.
    bits = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}
    digest = bits.get(alg[-3:], hashlib.sha256)(access_token.encode()).digest()
    return _b64url(digest[: len(digest) // 2])


class OidcClient:
    """The relying party: build authorization URLs, redeem codes, verify ID tokens."""

    def __init__(
        self,
        settings: OidcSettings,
        fernet: MultiFernet,
        *,
        session: aiohttp.ClientSession,
        prefix: str = "/_jit",
        leeway: float = 30.0,
        max_token_bytes: int = 8192,
        min_refetch_interval: float = 30.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._fernet = fernet
        self._http = session
        self._prefix = prefix
        self._clock = clock
        # Its own verifier: an ID token's audience is the client id, which no bearer-token
        # issuer config need accept.
        self._verifier = MultiVerifier(
            [IssuerConfig(settings.issuer, settings.client_id, settings.algorithms)],
            session=session,
            leeway=leeway,
            max_token_bytes=max(max_token_bytes, 16384),
            min_refetch_interval=min_refetch_interval,
            max_age=max_age,
            https_only=True,
        )

    async def warm_up(self) -> str | None:
        """Discover the provider and fetch its keys now; return the error, if any."""
        return (await self._verifier.warm_up()).get(self.settings.issuer)

    async def close(self) -> None:
        await self._verifier.close()

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document, fetched now if it is not yet known."""
        doc = self._verifier.documents.get(self.settings.issuer)
        if doc is None:
            error = await self.warm_up()
            doc = self._verifier.documents.get(self.settings.issuer)
            if doc is None:
                raise LoginError(f"identity provider unavailable: {error}")
        for key in ("authorization_endpoint", "token_endpoint"):
            url = doc.get(key)
            if not isinstance(url, str) or not secure_url(url):
                # The code and the client secret would travel in clear.
                raise LoginError(f"identity provider's {key} is missing or not https")
        return doc

    # --- the state cookie ----------------------------------------------------------------

    def pack(self, pending: list[Pending]) -> str:
        rows = [[p.state, p.nonce, p.verifier, p.next, p.expires] for p in pending]
        return self._fernet.encrypt(json.dumps(rows).encode()).decode()

    def unpack(self, cookie: str | None) -> list[Pending]:
        """The logins in flight that a state cookie holds; [] for a bad or expired one."""
        if not cookie:
            return []
        try:
            raw = self._fernet.decrypt(cookie.encode(), ttl=int(self.settings.login_timeout) + 1)
            rows = json.loads(raw)
            return [Pending(str(a), str(b), str(c), str(d), float(e)) for a, b, c, d, e in rows]
        except (InvalidToken, ValueError, TypeError):
            return []

    def live(self, pending: list[Pending]) -> list[Pending]:
        now = self._clock()
        return [p for p in pending if p.expires > now]

    # --- the flow ------------------------------------------------------------------------

    async def begin(self, next_path: str) -> tuple[str, Pending]:
        """Return the provider's authorization URL for a new login, and the login itself."""
        doc = await self.metadata()
        s = self.settings
        pending = Pending(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(64),  # 86 characters (RFC 7636: 43 to 128)
            next=next_path,
            expires=self._clock() + s.login_timeout,
        )
        challenge = _b64url(hashlib.sha256(pending.verifier.encode()).digest())
        params = {
            **dict(s.extra_auth_params),
            "response_type": "code",
            "client_id": s.client_id,
            "redirect_uri": s.redirect_uri,
            "scope": " ".join(s.scopes),
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        endpoint = str(doc["authorization_endpoint"])
        sep = "&" if "?" in endpoint else "?"
        return f"{endpoint}{sep}{urlencode(params, quote_via=quote)}", pending

    @staticmethod
    def take(pending: list[Pending], state: str) -> tuple[Pending | None, list[Pending]]:
        """Split off the login whose state matches; the rest stay in the cookie."""
        match = None
        rest = []
        for p in pending:
            if match is None and hmac.compare_digest(p.state.encode(), state.encode()):
                match = p
            else:
                rest.append(p)
        return match, rest

    async def finish(
        self, query: Mapping[str, str], pending: Pending
    ) -> tuple[dict[str, Any], str]:
        """Redeem the callback's code; return the verified ID token's claims and the token."""
        s = self.settings
        if pending.expires <= self._clock():
            raise LoginError("the sign-in took too long (identity.oidc.login_timeout); try again")
        iss = query.get("iss")
        if iss is not None and iss != s.issuer:
            # RFC 9207: a response from another provider (a mix-up attack).
            raise LoginError("the response names another issuer")
        code = query.get("code")
        if not code:
            raise LoginError("the identity provider sent no code")
        doc = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": s.redirect_uri,
            "code_verifier": pending.verifier,
        }
        headers = {"Accept": "application/json"}
        if s.client_secret is not None:
            # client_secret_basic: RFC 6749 2.3.1 form-encodes id and secret first.
            user = quote(s.client_id, safe="") + ":" + quote(s.client_secret.reveal(), safe="")
            headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        else:
            form["client_id"] = s.client_id
        try:
            async with self._http.post(
                str(doc["token_endpoint"]),
                data=form,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                body = await resp.content.read(_MAX_TOKEN_RESPONSE + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoginError(f"token endpoint unreachable: {type(exc).__name__}") from None
        try:
            tokens = json.loads(body) if len(body) <= _MAX_TOKEN_RESPONSE else None
        except ValueError:
            tokens = None
        if not isinstance(tokens, dict):
            raise LoginError(f"token endpoint answered HTTP {status} without JSON")
        if status != 200:
            error = str(tokens.get("error", "error"))[:60]
            raise LoginError(f"token endpoint refused the code: {error}")
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise LoginError("token endpoint sent no ID token")
        claims = await self._verify(id_token, pending, tokens.get("access_token"))
        return claims, id_token

    async def _verify(
        self, id_token: str, pending: Pending, access_token: object
    ) -> dict[str, Any]:
        s = self.settings
        try:
            claims = await self._verifier.verify(id_token)
        except TokenError as exc:
            raise LoginError(f"ID token refused: {exc.reason}") from None
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(
            nonce.encode(), pending.nonce.encode()
        ):
            raise LoginError("ID token refused: nonce does not match this sign-in")
        aud = claims.get("aud")
        azp = claims.get("azp")
        if azp is not None and azp != s.client_id:
            raise LoginError("ID token refused: azp names another client")
        if isinstance(aud, list) and len(aud) > 1 and azp is None:
            raise LoginError("ID token refused: several audiences and no azp")
        at_hash = claims.get("at_hash")
        if at_hash is not None and isinstance(access_token, str):
            alg = str(
                json.loads(base64.urlsafe_b64decode(id_token.split(".")[0] + "==")).get("alg")
            )
            if not hmac.compare_digest(str(at_hash), _at_hash(access_token, alg)):
                raise LoginError("ID token refused: at_hash does not match the access token")
        return claims

    async def logout_url(self, id_token: str | None) -> str | None:
        """The provider's end-session URL (RP-initiated logout), if it offers one."""
        doc = self._verifier.documents.get(self.settings.issuer)
        endpoint = doc.get("end_session_endpoint") if doc else None
        if not isinstance(endpoint, str) or not secure_url(endpoint):
            return None
        s = self.settings
        params = {"client_id": s.client_id, "post_logout_redirect_uri": self.after_logout}
        if id_token:
            params["id_token_hint"] = id_token
        sep = "&" if "?" in endpoint else "?"
        return f"{endpoint}{sep}{urlencode(params, quote_via=quote)}"

    @property
    def after_logout(self) -> str:
        """Where the provider sends the browser after its logout."""
        s = self.settings
        return s.post_logout_redirect or f"{s.public_url}{self._prefix}/login"
