"""JWKS identity end to end: real tokens from a real IdP (oidc-provider) through the proxy.

Every request goes through jitgate over TCP to the recording upstream; jitgate fetches
the IdP's discovery document and JWKS itself. The attack tokens are signed here, with
an attacker's key (its server must never be contacted) or with the key of a local
issuer the test holds, for the claim checks a real IdP would never get wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import SECRET, ProxyFactory, Upstream, bearer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from idp import Idp, idp_fixture
from jwtkit import KeyServer, b64, from_now, key_server, public_jwk, unsigned
from waiting import eventually

from proxy.state import STATE

idp = idp_fixture("idp", scope="module")

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
SCOPE = "recording:1/demo-1"
IDENTITY_ROUTE = "/dashboard"  # matches no route: the policy's default is identity
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LOCAL_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LOCAL_AUD = "jitgate-local"


def issuers_yaml(idp: Idp, local: KeyServer | None = None) -> str:
    text = f"""
    - issuer: "{idp.issuer}"
      audience: [jitgate, "urn:jitgate:api", "urn:jitgate:api:es256"]
      algorithms: [RS256, ES256]
"""
    if local is not None:
        text += f"""
    - issuer: "{local.url}"
      audience: {LOCAL_AUD}
      algorithms: [RS256]
      jwks_uri: "{local.jwks_uri}"
"""
    return text


def config(
    idp: Idp, *, local: KeyServer | None = None, refetch: float = 1.0, more: str = ""
) -> str:
    """An identity section with JWKS issuers only (no local keys), replacing the base one."""
    return f"""
identity:
  jwks_min_refetch_interval: {refetch}
  max_token_bytes: 4096
  issuers:
{issuers_yaml(idp, local)}
{more}
"""


async def add_grant(client: TestClient, user: str, scope: str = SCOPE, ttl: float = 60) -> None:
    await client.app[STATE].grants.add(user, scope, ttl, "test", "pytest")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refused(r: aiohttp.ClientResponse) -> str:
    assert r.status == 401, await r.text()
    body = await r.json()
    assert body["error"] == "unauthenticated"
    return " ".join(body["reasons"])


@pytest.fixture
async def local() -> AsyncIterator[KeyServer]:
    async with key_server() as ks:
        ks.add_key("local-1", LOCAL_KEY)
        yield ks


@pytest.fixture
async def attacker() -> AsyncIterator[KeyServer]:
    async with key_server() as ks:
        ks.add_key("attacker-1", ATTACKER_KEY)
        yield ks


# --- real tokens --------------------------------------------------------------------------


async def test_a_real_id_token_reaches_a_protected_route_under_a_grant(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    proxy = await make_proxy(extra=config(idp))
    tokens = await idp.login("alice")
    r = await proxy.get(SNAPSHOTS, headers=auth(tokens.id_token))
    assert r.status == 403  # verified, but no grant yet
    assert upstream.paths() == []
    await add_grant(proxy, "alice")
    r = await proxy.get(SNAPSHOTS, headers=auth(tokens.id_token))
    assert r.status == 200, await r.text()
    # The same token in jitgate's cookie works too, and for nobody else's grant.
    r = await proxy.get(SNAPSHOTS, cookies={"jitgate_token": tokens.id_token})
    assert r.status == 200
    bob = await idp.login("bob")
    assert (await proxy.get(SNAPSHOTS, headers=auth(bob.id_token))).status == 403
    assert upstream.paths() == [SNAPSHOTS, SNAPSHOTS]
    # What reached the upstream carried neither the token nor the cookie.
    for _, _, headers in upstream.hits:
        assert "Authorization" not in headers and "jitgate_token" not in headers.get("Cookie", "")


async def test_real_rs256_and_es256_access_tokens(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    proxy = await make_proxy(extra=config(idp))
    for resource, alg in (("urn:jitgate:api", "RS256"), ("urn:jitgate:api:es256", "ES256")):
        token = await idp.client_credentials(resource)
        assert jwt.get_unverified_header(token)["alg"] == alg
        await add_grant(proxy, "jitgate-service")  # RFC 9068: sub is the client's id
        r = await proxy.get(SNAPSHOTS, headers=auth(token))
        assert r.status == 200, await r.text()
    assert upstream.paths() == [SNAPSHOTS, SNAPSHOTS]


async def test_verified_jwks_tokens_are_cached_by_hash(make_proxy: ProxyFactory, idp: Idp) -> None:
    proxy = await make_proxy(extra=config(idp))
    token = (await idp.login("alice")).id_token
    for _ in range(3):
        assert (await proxy.get(IDENTITY_ROUTE, headers=auth(token))).status == 200
    cache = proxy.app[STATE].config.verifier._cache
    digest = hashlib.sha256(b"token\0" + token.encode()).digest()
    assert list(cache) == [digest]
    assert cache[digest][0].subject == "alice" and cache[digest][0].email == "alice@example.test"


async def test_key_rotation_mid_run_costs_one_refetch(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    proxy = await make_proxy(extra=config(idp, refetch=1.0))
    await add_grant(proxy, "alice")
    old = (await idp.login("alice")).id_token
    assert (await proxy.get(SNAPSHOTS, headers=auth(old))).status == 200
    before = await idp.jwks_requests()

    kids = await idp.rotate_keys()
    new = (await idp.login("alice")).id_token
    assert jwt.get_unverified_header(new)["kid"] == kids["RS256"]
    keys = proxy.app[STATE].config.verifier._jwks.key_sets[idp.issuer]
    # Past the refetch rate limit since the start-up fetch, as the key set itself sees it.
    await eventually(keys._may_fetch, what="the refetch rate limit to pass")
    # A burst of requests with the new kid: one refetch answers them all.
    results = await asyncio.gather(*(proxy.get(SNAPSHOTS, headers=auth(new)) for _ in range(8)))
    assert [r.status for r in results] == [200] * 8
    assert await idp.jwks_requests() - before == 1
    # Old and new keys keep verifying without another fetch; no restart was needed.
    for token in (new, old, (await idp.login("bob")).id_token):
        assert (await proxy.get(IDENTITY_ROUTE, headers=auth(token))).status == 200
    assert await idp.jwks_requests() - before == 1


async def test_an_unknown_kid_is_refused_after_exactly_one_refetch(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    proxy = await make_proxy(extra=config(idp, refetch=1.0))
    await add_grant(proxy, "mallory")
    keys = proxy.app[STATE].config.verifier._jwks.key_sets[idp.issuer]
    # Past the refetch rate limit since the start-up fetch, as the key set itself sees it.
    await eventually(keys._may_fetch, what="the refetch rate limit to pass")
    before = await idp.jwks_requests()
    token = jwt.encode(
        claims(idp.issuer, "jitgate"), ATTACKER_KEY, "RS256", headers={"kid": "nope-1"}
    )
    assert "unknown kid 'nope-1' after refetch" in await refused(
        await proxy.get(SNAPSHOTS, headers=auth(token))
    )
    assert await idp.jwks_requests() - before == 1
    # Again at once: the rate limit answers, the IdP is not asked.
    assert "refetch rate-limited" in await refused(await proxy.get(SNAPSHOTS, headers=auth(token)))
    assert await idp.jwks_requests() - before == 1
    assert upstream.hits == []


async def test_tokens_fail_closed_until_the_keys_load(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    token = (await idp.login("alice")).id_token
    await idp.set_jwks_status(503)
    try:
        proxy = await make_proxy(extra=config(idp, refetch=0.5))  # starts despite the IdP
        assert (await proxy.get("/_jit/healthz")).status == 200
        reason = await refused(await proxy.get(IDENTITY_ROUTE, headers=auth(token)))
        assert "JWKS" in reason and "503" in reason
        await idp.set_jwks_status(200)

        async def accepted() -> bool:  # once the refetch rate limit lets it try again
            return (await proxy.get(IDENTITY_ROUTE, headers=auth(token))).status == 200

        await eventually(accepted, what="the keys to load")
    finally:
        await idp.set_jwks_status(200)
    assert upstream.paths() == [IDENTITY_ROUTE]


async def test_local_keys_and_jwks_side_by_side_are_picked_by_iss(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    more = f"""
  algorithms: [HS256]
  hs_secret: {SECRET}
  issuer: jitgate-test
  audience: jitgate
"""
    proxy = await make_proxy(extra=config(idp, more=more))
    assert (await proxy.get(IDENTITY_ROUTE, headers=bearer("carol"))).status == 200
    real = (await idp.login("alice")).id_token
    assert (await proxy.get(IDENTITY_ROUTE, headers=auth(real))).status == 200
    # The local HMAC secret cannot vouch for the IdP's users: iss sends the token to the
    # IdP's keys, which allow no HS256.
    forged = jwt.encode(claims(idp.issuer, "jitgate", sub="alice"), SECRET, "HS256")
    reason = await refused(await proxy.get(IDENTITY_ROUTE, headers=auth(forged)))
    assert f"algorithm HS256 not allowed for issuer {idp.issuer}" in reason
    assert len(upstream.hits) == 2


# --- the attack table, through the proxy --------------------------------------------------


def claims(iss: str, aud: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"iss": iss, "aud": aud, "sub": "mallory", "iat": now, "exp": now + 300}
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class Ctx:
    issuer: str
    rs_kid: str
    rs_pem: bytes
    attacker: KeyServer
    local: KeyServer


def _signed(header: dict[str, Any], body: dict[str, Any]) -> str:
    # By hand, so that any header (jku, x5u, jwk) goes out exactly as written.
    head = unsigned({"alg": "RS256", "typ": "JWT", **header}, body)
    sig = ATTACKER_KEY.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{b64(sig)}"


def _attacker(c: Ctx, kid: str | None = None, **header: Any) -> str:
    return _signed({"kid": kid or c.rs_kid, **header}, claims(c.issuer, "jitgate"))


def _alg_none(c: Ctx) -> str:
    return unsigned({"alg": "none", "typ": "JWT"}, claims(c.issuer, "jitgate")) + "."


def _hs256_with_public_key(c: Ctx) -> str:
    # The classic confusion: HMAC keyed with the RSA public key anyone can download.
    head = unsigned({"alg": "HS256", "kid": c.rs_kid}, claims(c.issuer, "jitgate"))
    sig = hmac.new(c.rs_pem, head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64(sig)}"


def _local(**over: Any) -> Callable[[Ctx], str]:
    """Signed by the local issuer, whose key jitgate trusts: only the claims are wrong."""
    aud = over.pop("aud", LOCAL_AUD)
    return lambda c: c.local.token(aud, **over)


ATTACKS: list[tuple[str, Callable[[Ctx], str], str]] = [
    ("alg-none", _alg_none, "algorithm none not allowed"),
    ("hs256-signed-with-rs256-public-key", _hs256_with_public_key, "algorithm HS256 not allowed"),
    ("kid-path", lambda c: _attacker(c, "../../etc/passwd"), "kid is not a plain key id"),
    ("kid-absolute-path", lambda c: _attacker(c, "/dev/null"), "kid is not a plain key id"),
    ("kid-sql", lambda c: _attacker(c, "x' OR '1'='1"), "kid is not a plain key id"),
    ("kid-sql-statement", lambda c: _attacker(c, "1;DROP TABLE keys--"), "kid is not a plain"),
    ("jku-attacker-kid", lambda c: _attacker(c, "attacker-1", jku=c.attacker.jwks_uri),
     "unknown kid 'attacker-1'"),
    ("jku-real-kid", lambda c: _attacker(c, jku=c.attacker.jwks_uri), "signature does not verify"),
    ("x5u", lambda c: _attacker(c, x5u=f"{c.attacker.url}/cert.pem"), "signature does not verify"),
    ("jwk-embedded", lambda c: _attacker(c, jwk=public_jwk(ATTACKER_KEY, c.rs_kid)),
     "signature does not verify"),
    ("jwk-embedded-own-kid", lambda c: _attacker(c, "attacker-1",
                                                 jwk=public_jwk(ATTACKER_KEY, "attacker-1")),
     "unknown kid 'attacker-1'"),
    ("expired", lambda c: c.local.token(LOCAL_AUD, **from_now(iat=-900, exp=-600)),
     "token expired"),
    ("nbf-in-the-future", lambda c: c.local.token(LOCAL_AUD, **from_now(nbf=600)),
     "not yet valid (nbf)"),
    ("wrong-iss", lambda c: _signed({"kid": c.rs_kid}, claims("https://evil.test", "jitgate")),
     "unknown issuer https://evil.test"),
    ("wrong-aud", _local(aud="someone-else"), "audience not accepted"),
    ("other-issuers-aud", _local(aud="jitgate"), "audience not accepted"),
    ("oversize", lambda c: c.local.token(LOCAL_AUD, pad="x" * 5000), "token too large"),
    ("garbage", lambda c: "not.a.jwt", "malformed token"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
async def test_jwt_attack_is_refused_by_the_proxy(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    idp: Idp,
    attacker: KeyServer,
    local: KeyServer,
    build: Callable[[Ctx], str],
    reason: str,
) -> None:
    proxy = await make_proxy(extra=config(idp, local=local, refetch=30))
    await add_grant(proxy, "mallory")
    stats = await idp.stats()
    rs_kid = stats["kids"]["RS256"]
    async with aiohttp.ClientSession() as session, session.get(idp.jwks_uri) as resp:
        published = {k["kid"]: k for k in (await resp.json(content_type=None))["keys"]}
    pem = jwt.PyJWK(published[rs_kid]).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = build(Ctx(idp.issuer, rs_kid, pem, attacker, local))

    # The control: mallory's grant is good and a genuine token of hers gets through...
    assert (await proxy.get(SNAPSHOTS, headers=auth(local.token(LOCAL_AUD)))).status == 200
    # ...the attack token does not, neither as a bearer nor as jitgate's cookie.
    assert reason in await refused(await proxy.get(SNAPSHOTS, headers=auth(token)))
    assert reason in await refused(await proxy.get(SNAPSHOTS, cookies={"jitgate_token": token}))
    assert len(upstream.hits) == 1  # only the control reached the upstream
    assert attacker.requests == []  # jku, x5u and jwk never lead anywhere
