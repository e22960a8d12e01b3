"""identity/jwks.py against a real OpenID Provider (oidc-provider under node, see tests/idp.py).

Tokens come from scripted logins at the real provider wherever it can produce them. The
attack tokens are signed here: with an attacker's key (served by a real attacker server
that must never be contacted), or with the key of a local issuer whose JWKS a small real
aiohttp server publishes, for the claim checks (exp, nbf, aud) the provider would never
get wrong on its own.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from idp import Idp, IdpError, idp_fixture, start_idp
from jwtkit import from_now

from proxy.identity.jwks import IssuerConfig, MultiVerifier, discover
from proxy.identity.keyset import KeySet, TokenError, check_kid

idp = idp_fixture("idp", scope="module")
idp2 = idp_fixture("idp2", scope="module")

ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LOCAL_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LOCAL_AUD = "jitgate-local"


class Clock:
    """The key sets' monotonic clock, moved by hand: rate limits without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(iss: str, aud: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": iss, "aud": aud, "sub": "mallory", "iat": now}
    claims.update(exp=now + 300, groups=["security"])
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}"


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def self_signed_der(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.attacker.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Recorder:
    """A real HTTP server that records every request it gets."""

    url: str
    requests: list[str] = field(default_factory=list)


@pytest.fixture
async def attacker() -> AsyncIterator[Recorder]:
    """The attacker's server: it offers a JWKS and a certificate for ATTACKER_KEY."""
    rec = Recorder("")

    async def any_path(request: web.Request) -> web.Response:
        rec.requests.append(request.path_qs)
        if request.path.endswith(".pem"):
            return web.Response(body=self_signed_der(ATTACKER_KEY))
        return web.json_response({"keys": [jwk_of(ATTACKER_KEY, "attacker-1")]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    rec.url = str(server.make_url("")).rstrip("/")
    yield rec
    await server.close()


@pytest.fixture
async def local() -> AsyncIterator[Recorder]:
    """An issuer whose private key the test holds; its JWKS says Cache-Control max-age=120."""
    rec = Recorder("")

    async def jwks(request: web.Request) -> web.Response:
        rec.requests.append(request.path_qs)
        body = {"keys": [jwk_of(LOCAL_KEY, "local-1")]}
        return web.json_response(body, headers={"Cache-Control": "public, max-age=120"})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    rec.url = str(server.make_url("")).rstrip("/")
    yield rec
    await server.close()


def local_token(local: Recorder, **over: Any) -> str:
    claims = {**claims_for(local.url, LOCAL_AUD), **over}
    claims = {k: v for k, v in claims.items() if v is not None}  # None: leave the claim out
    return jwt.encode(claims, LOCAL_KEY, "RS256", headers={"kid": "local-1"})


def idp_config(idp: Idp, audience: str | tuple[str, ...] = "jitgate", **kw: Any) -> IssuerConfig:
    # No jwks_uri: it comes from discovery, as in production.
    return IssuerConfig(idp.issuer, audience, kw.pop("algorithms", ("RS256", "ES256")), **kw)


def local_config(local: Recorder) -> IssuerConfig:
    return IssuerConfig(local.url, LOCAL_AUD, ("RS256",), jwks_uri=f"{local.url}/jwks")


async def fetched(idp: Idp, before: int) -> int:
    """JWKS requests the provider answered since `before`."""
    return await idp.jwks_requests() - before


# --- discovery --------------------------------------------------------------------------


async def test_discovery_reads_the_document_and_checks_its_issuer(idp: Idp) -> None:
    async with aiohttp.ClientSession() as session:
        doc = await discover(idp.issuer, session)
        assert doc["issuer"] == idp.issuer
        assert doc["jwks_uri"] == idp.jwks_uri
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert doc["end_session_endpoint"] == f"{idp.issuer}/session/end"
        # Same document, but it names "http://host:port", not "http://host:port/".
        with pytest.raises(TokenError, match="names issuer"):
            await discover(idp.issuer + "/", session)
        with pytest.raises(TokenError, match="HTTP 404"):
            await discover(idp.issuer + "/tenant-b", session)


async def test_discovery_refuses_a_document_for_another_issuer(idp: Idp) -> None:
    # A server that copies the real provider's document: its issuer is not ours.
    async def copy(request: web.Request) -> web.Response:
        return web.json_response(await idp.discovery())

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", copy)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        mirror = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TokenError, match=re.escape(f"names issuer {idp.issuer}")):
                await discover(mirror, session)
        # Through the verifier too: that issuer's tokens are refused, nothing is fetched.
        async with MultiVerifier([IssuerConfig(mirror, "jitgate")]) as v:
            token = jwt.encode(claims_for(mirror, "jitgate"), ATTACKER_KEY, "RS256")
            with pytest.raises(TokenError, match="names issuer"):
                await v.verify(token)
            assert v.key_sets == {}
    finally:
        await server.close()


# --- real tokens ------------------------------------------------------------------------


@pytest.mark.parametrize(("client_id", "alg"), [("jitgate", "RS256"), ("jitgate-es256", "ES256")])
async def test_verifies_an_id_token_from_a_scripted_login(
    idp: Idp, client_id: str, alg: str
) -> None:
    tokens = await idp.login("alice", client_id=client_id)
    assert jwt.get_unverified_header(tokens.id_token)["alg"] == alg
    async with MultiVerifier([idp_config(idp, client_id)]) as v:
        claims = await v.verify(tokens.id_token)
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == client_id
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.test"
    assert claims["groups"] == ["eng"]


async def test_groups_come_from_the_login_name(idp: Idp) -> None:
    async with MultiVerifier([idp_config(idp)]) as v:
        for user, groups in [("bob", ["approvers"]), ("sam", ["security"]), ("eve", [])]:
            claims = await v.verify((await idp.login(user)).id_token)
            assert (claims["sub"], claims["groups"]) == (user, groups)


async def test_verifies_client_credentials_access_tokens(idp: Idp) -> None:
    config = idp_config(idp, ("urn:jitgate:api", "urn:jitgate:api:es256"))
    async with MultiVerifier([config]) as v:
        for resource, alg in [("urn:jitgate:api", "RS256"), ("urn:jitgate:api:es256", "ES256")]:
            token = await idp.client_credentials(resource)
            assert jwt.get_unverified_header(token)["alg"] == alg
            claims = await v.verify(token)
            assert (claims["aud"], claims["sub"]) == (resource, "jitgate-service")


async def test_an_algorithm_outside_the_issuer_list_is_refused(idp: Idp) -> None:
    token = (await idp.login("alice")).id_token  # RS256
    async with MultiVerifier([idp_config(idp, algorithms=("ES256",))]) as v:
        with pytest.raises(
            TokenError, match=re.escape(f"algorithm RS256 not allowed for issuer {idp.issuer}")
        ):
            await v.verify(token)
        assert v.key_sets == {}  # refused before discovery or any fetch


async def test_a_tampered_id_token_is_refused(idp: Idp) -> None:
    token = (await idp.login("alice")).id_token
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["groups"] = ["security"]
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    async with MultiVerifier([idp_config(idp)]) as v:
        assert (await v.verify(token))["groups"] == ["eng"]
        with pytest.raises(TokenError, match="signature does not verify"):
            await v.verify(forged)


# --- rotation and refetching ------------------------------------------------------------


async def test_key_rotation_costs_exactly_one_refetch(idp: Idp) -> None:
    clock = Clock()
    async with MultiVerifier([idp_config(idp)], clock=clock) as v:
        before = await idp.jwks_requests()
        old = (await idp.login("alice")).id_token
        await v.verify(old)
        keys = v.key_sets[idp.issuer]
        assert keys.fetches == 1 and await fetched(idp, before) == 1

        kids = await idp.rotate_keys()
        new = (await idp.login("alice")).id_token
        assert jwt.get_unverified_header(new)["kid"] == kids["RS256"] not in keys.kids

        # Within the rate limit the new kid is refused without asking the provider...
        with pytest.raises(TokenError, match="rate-limited"):
            await v.verify(new)
        assert keys.fetches == 1 and await fetched(idp, before) == 1
        # ...after it, one refetch finds the new key.
        clock.advance(keys.min_refetch_interval)
        assert (await v.verify(new))["sub"] == "alice"
        assert keys.fetches == 2 and await fetched(idp, before) == 2
        # The new key and the old one (still published) now verify without fetching.
        await v.verify(new)
        await v.verify(old)
        await v.verify((await idp.login("bob")).id_token)
        assert keys.fetches == 2 and await fetched(idp, before) == 2


async def test_a_retired_key_stops_verifying_after_the_refresh(idp: Idp) -> None:
    clock = Clock()
    async with MultiVerifier([idp_config(idp)], clock=clock) as v:
        old = (await idp.login("alice")).id_token
        await v.verify(old)
        await idp.rotate_keys(retire=True)
        keys = v.key_sets[idp.issuer]
        clock.advance(keys.max_age)
        await v.verify(old)  # still cached: this call starts the background refresh
        await keys.wait_idle()
        assert keys.fetches == 2
        with pytest.raises(TokenError, match="unknown kid"):
            await v.verify(old)


async def test_an_unknown_kid_is_refused_after_one_refetch(idp: Idp) -> None:
    clock = Clock()
    async with MultiVerifier([idp_config(idp)], clock=clock) as v:
        await v.warm_up()
        keys = v.key_sets[idp.issuer]
        before = await idp.jwks_requests()
        clock.advance(keys.min_refetch_interval)
        token = jwt.encode(
            claims_for(idp.issuer, "jitgate"), ATTACKER_KEY, "RS256", headers={"kid": "nope-1"}
        )
        with pytest.raises(TokenError, match="unknown kid 'nope-1' after refetch"):
            await v.verify(token)
        assert await fetched(idp, before) == 1
        with pytest.raises(
            TokenError, match=re.escape("unknown kid 'nope-1' (refetch rate-limited)")
        ):
            await v.verify(token)
        assert await fetched(idp, before) == 1


async def test_a_burst_of_unknown_kids_fetches_at_most_once(idp: Idp) -> None:
    clock = Clock()
    claims = claims_for(idp.issuer, "jitgate")

    def burst() -> list[str]:
        return [
            jwt.encode(claims, ATTACKER_KEY, "RS256", headers={"kid": secrets.token_hex(8)})
            for _ in range(100)
        ]

    async with MultiVerifier([idp_config(idp)], clock=clock) as v:
        before = await idp.jwks_requests()
        # Cold: the first fetch is shared by all hundred.
        results = await asyncio.gather(*(v.verify(t) for t in burst()), return_exceptions=True)
        assert all(isinstance(r, TokenError) and "unknown kid" in r.reason for r in results)
        keys = v.key_sets[idp.issuer]
        assert keys.fetches == 1 and await fetched(idp, before) == 1
        # Within the interval: nothing at all.
        results = await asyncio.gather(*(v.verify(t) for t in burst()), return_exceptions=True)
        assert all(isinstance(r, TokenError) for r in results)
        assert keys.fetches == 1 and await fetched(idp, before) == 1
        # After it: one refetch for the whole burst, then nothing again.
        clock.advance(keys.min_refetch_interval)
        results = await asyncio.gather(*(v.verify(t) for t in burst()), return_exceptions=True)
        assert all(isinstance(r, TokenError) and "unknown kid" in r.reason for r in results)
        assert keys.fetches == 2 and await fetched(idp, before) == 2
        # A real token still verifies throughout.
        assert (await v.verify((await idp.login("alice")).id_token))["sub"] == "alice"


async def test_known_keys_keep_working_while_the_jwks_endpoint_fails(idp: Idp) -> None:
    clock = Clock()
    token = (await idp.login("alice")).id_token
    async with MultiVerifier([idp_config(idp)], clock=clock) as v:
        await v.verify(token)
        keys = v.key_sets[idp.issuer]
        await idp.set_jwks_status(503)
        try:
            clock.advance(keys.max_age)  # stale: the next call refreshes behind itself
            await v.verify(token)
            await keys.wait_idle()
            assert keys.fetches == 2 and keys.last_error == "JWKS endpoint answered HTTP 503"
            await v.verify(token)
            clock.advance(keys.min_refetch_interval)
            forged = jwt.encode(
                claims_for(idp.issuer, "jitgate"), ATTACKER_KEY, "RS256", headers={"kid": "k9"}
            )
            with pytest.raises(TokenError, match="refetch failed: JWKS endpoint answered HTTP 503"):
                await v.verify(forged)
        finally:
            await idp.set_jwks_status(200)
        # A cold verifier while it is down would refuse everything: it knows no key.
    async with MultiVerifier([idp_config(idp)], clock=clock) as cold:
        await idp.set_jwks_status(503)
        try:
            with pytest.raises(TokenError, match="JWKS unavailable"):
                await cold.verify(token)
        finally:
            await idp.set_jwks_status(200)


async def test_known_keys_keep_working_when_the_provider_is_gone() -> None:
    clock = Clock()
    with start_idp() as gone:
        token = (await gone.login("alice")).id_token
        v = MultiVerifier([idp_config(gone)], clock=clock)
        await v.verify(token)
    try:
        keys = v.key_sets[gone.issuer]
        clock.advance(keys.max_age)
        assert (await v.verify(token))["sub"] == "alice"
        clock.advance(keys.min_refetch_interval)
        await keys.refresh()
        assert keys.last_error == "JWKS fetch failed: ClientConnectorError"
        assert (await v.verify(token))["sub"] == "alice"
        clock.advance(keys.min_refetch_interval)
        forged = jwt.encode(
            claims_for(gone.issuer, "jitgate"), ATTACKER_KEY, "RS256", headers={"kid": "k9"}
        )
        with pytest.raises(TokenError, match="refetch failed"):
            await v.verify(forged)
    finally:
        await v.close()


async def test_cache_control_max_age_decides_the_refresh(local: Recorder) -> None:
    clock = Clock()
    keys = KeySet(f"{local.url}/jwks", clock=clock)
    try:
        await keys.key_for("local-1", "RS256")
        clock.advance(119)
        await keys.key_for("local-1", "RS256")
        assert len(local.requests) == 1
        clock.advance(1)  # 120 s: the response's max-age, well before the 1 h default
        await keys.key_for("local-1", "RS256")
        await keys.wait_idle()
        assert len(local.requests) == 2
    finally:
        await keys.close()


# --- two issuers ------------------------------------------------------------------------


async def test_two_issuers_each_with_its_own_audience_and_algorithms(idp: Idp, idp2: Idp) -> None:
    first = idp_config(idp, "jitgate", algorithms=("RS256",))
    second = idp_config(idp2, "jitgate-es256", algorithms=("RS256", "ES256"))
    async with MultiVerifier([first, second]) as v:
        a = await v.verify((await idp.login("alice")).id_token)
        b = await v.verify((await idp2.login("bob", client_id="jitgate-es256")).id_token)
        assert (a["iss"], a["aud"], a["sub"]) == (idp.issuer, "jitgate", "alice")
        assert (b["iss"], b["aud"], b["sub"]) == (idp2.issuer, "jitgate-es256", "bob")
        # The audience one issuer accepts is refused from the other.
        with pytest.raises(
            TokenError, match=re.escape(f"audience not accepted for issuer {idp2.issuer}")
        ):
            await v.verify((await idp2.login("alice", client_id="jitgate")).id_token)
        with pytest.raises(
            TokenError, match=re.escape(f"algorithm ES256 not allowed for issuer {idp.issuer}")
        ):
            await v.verify((await idp.login("alice", client_id="jitgate-es256")).id_token)
        with pytest.raises(TokenError, match="unknown issuer"):
            await v.verify(
                jwt.encode(claims_for("https://other.test", "jitgate"), ATTACKER_KEY, "RS256")
            )
        assert v.key_sets[idp.issuer].jwks_uri == idp.jwks_uri
        assert v.key_sets[idp2.issuer].jwks_uri == idp2.jwks_uri
        assert v.key_sets[idp.issuer].fetches == v.key_sets[idp2.issuer].fetches == 1


# --- the attack table -------------------------------------------------------------------


@dataclass
class Ctx:
    issuer: str
    rs_kid: str
    es_kid: str
    rs_pem: bytes
    real: str  # a real ID token for aud "jitgate"
    attacker: Recorder
    local: Recorder


def _hs256_with_pem(c: Ctx) -> str:
    # The classic confusion: HMAC keyed with the RSA public key, which anyone can fetch.
    head = unsigned({"alg": "HS256", "kid": c.rs_kid}, claims_for(c.issuer, "jitgate"))
    sig = hmac.new(c.rs_pem, head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64(sig)}"


def _signed(header: dict[str, Any], claims: dict[str, Any]) -> str:
    # By hand, for headers PyJWT refuses to write (a kid that is not a string).
    head = unsigned({"alg": "RS256", **header}, claims)
    sig = ATTACKER_KEY.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{b64(sig)}"


def _attacker(c: Ctx, kid: str | None = None, **headers: Any) -> str:
    """Signed with the attacker's key, for the real issuer, kid = the real kid by default."""
    return _signed({"kid": kid or c.rs_kid, **headers}, claims_for(c.issuer, "jitgate"))


def _kid(kid: Any) -> Callable[[Ctx], str]:
    return lambda c: _signed({"kid": kid}, claims_for(c.issuer, "jitgate"))


def _none(c: Ctx, alg: str = "none", **header: Any) -> str:
    return unsigned({"alg": alg, **header}, claims_for(c.issuer, "jitgate")) + "."


def _real_with_header(c: Ctx, **header: Any) -> str:
    """The real token's payload and signature under another header."""
    _, body, sig = c.real.split(".")
    return f"{b64(json.dumps(header).encode())}.{body}.{sig}"


def _local(**over: Any) -> Callable[[Ctx], str]:
    """Signed by the local issuer, whose key the verifier trusts: only the claims are off."""
    return lambda c: local_token(c.local, **over)


def _x5c(c: Ctx) -> str:
    return _attacker(c, x5c=[base64.b64encode(self_signed_der(ATTACKER_KEY)).decode()])


ATTACKS: list[tuple[str, Callable[[Ctx], str], str]] = [
    ("alg-none", _none, "algorithm none not allowed"),
    ("alg-None", lambda c: _none(c, "None", kid=c.rs_kid), "algorithm none not allowed"),
    ("alg-NONE", lambda c: _none(c, "NONE"), "algorithm none not allowed"),
    ("hs256-with-rs-public-pem", _hs256_with_pem, "algorithm HS256 not allowed for issuer"),
    ("kid-path", _kid("../../etc/passwd"), "kid is not a plain key id"),
    ("kid-absolute-path", _kid("/dev/null"), "kid is not a plain key id"),
    ("kid-sql", _kid("x' OR '1'='1"), "kid is not a plain key id"),
    ("kid-sql-statement", _kid("1;DROP TABLE keys--"), "kid is not a plain key id"),
    ("kid-overlong", _kid("k" * 129), "kid is not a plain key id"),
    ("kid-nul", _kid("rs256\x00"), "kid is not a plain key id"),
    ("kid-not-a-string", _kid(7), "kid is not a string"),
    ("jku-real-kid", lambda c: _attacker(c, jku=f"{c.attacker.url}/jwks.json"),
     "signature does not verify"),
    ("jku-attacker-kid", lambda c: _attacker(c, "attacker-1", jku=f"{c.attacker.url}/jwks.json"),
     "unknown kid 'attacker-1'"),
    ("x5u", lambda c: _attacker(c, x5u=f"{c.attacker.url}/cert.pem"), "signature does not verify"),
    ("jwk-embedded", lambda c: _attacker(c, jwk=jwk_of(ATTACKER_KEY, c.rs_kid)),
     "signature does not verify"),
    ("x5c-embedded", _x5c, "signature does not verify"),
    ("alg-kid-mismatch", lambda c: _real_with_header(c, alg="RS256", kid=c.es_kid),
     "does not fit algorithm RS256"),
    ("crit-header", lambda c: _attacker(c, crit=["exp"], exp=1), "critical header"),
    ("expired", lambda c: local_token(c.local, **from_now(iat=-900, exp=-600)), "token expired"),
    ("nbf-future", lambda c: local_token(c.local, **from_now(nbf=600)), "not yet valid (nbf)"),
    ("iat-future", lambda c: local_token(c.local, **from_now(iat=600)), "not yet valid (iat)"),
    ("no-exp", _local(exp=None), "lacks the 'exp' claim"),
    ("wrong-aud", _local(aud="someone-else"), "audience not accepted"),
    ("no-aud", _local(aud=None), "lacks the 'aud' claim"),
    ("wrong-iss", lambda c: _signed({"kid": c.rs_kid}, claims_for("https://evil.test", "jitgate")),
     "unknown issuer https://evil.test"),
    ("other-issuers-kid", lambda c: _signed({"kid": "local-1"}, claims_for(c.local.url, LOCAL_AUD)),
     "signature does not verify"),
    ("oversize", lambda c: _attacker(c, pad="x" * 9000), "token too large"),
    ("jwe-shaped", lambda c: "e30.e30.e30.e30.e30", "malformed token"),
    ("garbage", lambda c: "not-a-jwt", "malformed token"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
async def test_attack_is_refused(
    idp: Idp, attacker: Recorder, local: Recorder, build: Callable[[Ctx], str], reason: str
) -> None:
    real = (await idp.login("alice")).id_token
    stats = await idp.stats()
    async with aiohttp.ClientSession() as session, session.get(idp.jwks_uri) as resp:
        published = {k["kid"]: k for k in (await resp.json(content_type=None))["keys"]}
    rs_key = jwt.PyJWK(published[stats["kids"]["RS256"]]).key
    pem = rs_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kids = stats["kids"]
    token = build(Ctx(idp.issuer, kids["RS256"], kids["ES256"], pem, real, attacker, local))
    async with MultiVerifier([idp_config(idp), local_config(local)]) as v:
        await v.warm_up()
        assert (await v.verify(real))["sub"] == "alice"  # the verifier works: only the attack fails
        fetches = {iss: keys.fetches for iss, keys in v.key_sets.items()}
        with pytest.raises(TokenError) as err:
            await v.verify(token)
        assert reason in err.value.reason
        if "kid" in reason and "unknown" not in reason:
            # A bad kid is refused before any lookup: no fetch was made for it.
            assert {iss: keys.fetches for iss, keys in v.key_sets.items()} == fetches
    assert attacker.requests == []  # jku, x5u, x5c never lead anywhere


async def test_bad_kid_is_refused_before_discovery_or_fetch(idp: Idp) -> None:
    async with MultiVerifier([idp_config(idp)]) as v:
        before = await idp.jwks_requests()
        with pytest.raises(TokenError, match="kid is not a plain key id"):
            await v.verify(_signed({"kid": "../../etc/passwd"}, claims_for(idp.issuer, "jitgate")))
        assert v.key_sets == {}
        assert await fetched(idp, before) == 0


async def test_key_set_never_offers_a_key_for_hmac_or_a_misfit(idp: Idp) -> None:
    keys = KeySet(idp.jwks_uri)
    try:
        kids = (await idp.stats())["kids"]
        assert (await keys.key_for(kids["RS256"], "RS256")).key_id == kids["RS256"]
        for alg in ("HS256", "none"):
            with pytest.raises(TokenError, match="not supported"):
                await keys.key_for(kids["RS256"], alg)
        with pytest.raises(TokenError, match="does not fit algorithm ES256"):
            await keys.key_for(kids["RS256"], "ES256")
        with pytest.raises(TokenError, match="does not fit algorithm PS256"):
            await keys.key_for(kids["RS256"], "PS256")  # the JWK says alg RS256
    finally:
        await keys.close()


@pytest.mark.parametrize(
    ("kid", "ok"),
    [
        (None, True),
        ("rs256-1-9a67d0fd", True),
        ("nOo3ZDrODXEK1jKWhXslHR_KXEg", True),  # base64url (Entra ID style)
        ("abcd+efgh/ijkl=", True),  # base64 (Cognito style)
        ("0f3e8f0c-3f5e-4a52-9d45-1c4bd1c0c2a1", True),
        ("../../etc/passwd", False),
        ("keys/../../secret", False),
        ("/etc/passwd", False),
        (".hidden", False),
        ("a//b", False),
        ("x' OR '1'='1", False),
        ('"; DROP TABLE keys; --', False),
        ("a b", False),
        ("k" * 128, True),
        ("k" * 129, False),
        ("", False),
    ],
)
def test_check_kid(kid: str | None, ok: bool) -> None:
    if ok:
        assert check_kid(kid) == kid
    else:
        with pytest.raises(TokenError):
            check_kid(kid)


async def test_unusable_keys_in_a_published_set_are_skipped(aiohttp_server: Any) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    good = jwk_of(LOCAL_KEY, "good")
    served = {
        "keys": [
            {**jwk_of(ATTACKER_KEY, "enc"), "use": "enc"},
            {**jwk_of(ATTACKER_KEY, "wrap"), "key_ops": ["wrapKey"]},
            {"kty": "oct", "kid": "secret", "k": b64(b"shared-secret"), "alg": "HS256"},
            {**jwk_of(ATTACKER_KEY, "private"), "d": "AQAB"},
            jwk_of(small, "short"),
            {**jwk_of(ATTACKER_KEY, "../x")},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            good,
        ]
    }

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(served)

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    keys = KeySet(str(server.make_url("/jwks")))
    try:
        assert (await keys.key_for("good", "RS256")).key_id == "good"
        assert keys.kids == ("good",)
    finally:
        await keys.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithms": ("none",)}, "none is never allowed"),
        ({"algorithms": ("HS256",)}, "needs a shared secret"),
        ({"algorithms": ("RS256", "HS512")}, "needs a shared secret"),
        ({"algorithms": ()}, "at least one algorithm"),
        ({"algorithms": ("RS1",)}, "algorithm RS1"),
        ({"audience": ""}, "audience"),
        ({"issuer": "idp.example.com"}, "http(s) URL"),
        ({"jwks_uri": "file:///etc/passwd"}, "jwks_uri"),
    ],
)
def test_issuer_config_is_checked(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"issuer": "https://idp.example.com", "audience": "jitgate"}
    with pytest.raises(ValueError) as err:
        IssuerConfig(**{**base, **kwargs})
    assert message in str(err.value)


async def test_rp_initiated_logout_ends_the_provider_session(idp: Idp) -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        tokens = await idp.login("alice", session=session)
        landed = await idp.logout(session, tokens.id_token)
        assert landed == f"{idp.redirect_uris[0]}?state=bye"
        meta = await idp.discovery()
        # Signed out: authorizing again shows the login page instead of redirecting back.
        query = {
            "client_id": "jitgate", "response_type": "code", "scope": "openid",
            "redirect_uri": idp.redirect_uris[0], "code_challenge": "x" * 43,
            "code_challenge_method": "S256",
        }  # fmt: skip
        async with session.get(meta["authorization_endpoint"], params=query) as resp:
            assert resp.status == 200
            assert 'name="login"' in await resp.text()


async def test_jwks_bodies_are_read_whole_and_bounded(aiohttp_server: Any) -> None:
    # Padding in an unusable key makes the body span many reads; past the limit it is
    # refused and the keys already held stay.
    served: dict[str, Any] = {}

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(served)

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    clock = Clock()
    keys = KeySet(str(server.make_url("/jwks")), clock=clock, max_bytes=400_000)
    try:
        served["keys"] = [{"kty": "oct", "k": "A" * 300_000}, jwk_of(LOCAL_KEY, "good")]
        assert (await keys.key_for("good", "RS256")).key_id == "good"
        served["keys"] = [{"kty": "oct", "k": "A" * 500_000}, jwk_of(LOCAL_KEY, "new")]
        clock.advance(keys.min_refetch_interval)
        assert await keys.refresh() is False
        assert keys.last_error == "JWKS response too large"
        assert keys.kids == ("good",)
    finally:
        await keys.close()


def test_a_missing_node_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(IdpError, match="node is not on PATH"), start_idp():
        pass
