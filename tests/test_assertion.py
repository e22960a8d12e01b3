"""The identity assertion jitgate sends upstream, checked at the real upstream with the
keys jitgate serves at /_jit/.well-known/jwks.json."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, Upstream, bearer, make_token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.errors import ConfigErrors
from proxy.identity import Identity
from proxy.identity.assertion import AssertionKeyError, AssertionSigner, load_or_create_key
from proxy.settings import load
from proxy.settings.identity import AssertionSettings
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
HEADER = "x-jitgate-assertion"


async def served_keys(proxy: TestClient) -> dict[str, Any]:
    r = await proxy.get("/_jit/.well-known/jwks.json")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/jwk-set+json")
    keys: dict[str, Any] = await r.json(content_type=None)
    return keys


def verify(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """Verify as an upstream would: with the served key named by the token's kid."""
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=[jwk["alg"]],
        audience=audience,
        issuer="jitgate",
        options={"require": ["exp", "iat", "aud", "iss", "sub"]},
    )
    return claims


def last_headers(upstream: Upstream) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in upstream.hits[-1][2].items()]


async def test_the_upstream_gets_an_assertion_that_verifies_with_the_served_keys(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    proxy = await make_proxy(extra="forward: {assertion: true}\n")
    await proxy.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "test", "pytest")
    token = make_token("alice", groups=["eng", "support"], email="alice@example.test")
    forged = jwt.encode({"sub": "admin", "aud": upstream.url, "exp": 2**31}, "x" * 32)
    headers = {"Authorization": f"Bearer {token}", "X-Jitgate-Assertion": forged}
    r = await proxy.get(SNAPSHOTS, headers=headers)
    assert r.status == 200, await r.text()

    sent = [v for k, v in last_headers(upstream) if k == HEADER]
    assert len(sent) == 1 and sent[0] != forged  # the client's copy was replaced
    jwks = await served_keys(proxy)
    claims = verify(sent[0], jwks, audience=upstream.url)
    assert claims["aud"] == upstream.url
    assert (claims["sub"], claims["email"], claims["groups"]) == (
        "alice", "alice@example.test", ["eng", "support"],
    )  # fmt: skip
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert abs(claims["iat"] - time.time()) < 5
    assert jwks["keys"][0]["alg"] == "ES256" and "d" not in jwks["keys"][0]
    # The key was made at the first start, for jitgate's eyes only.
    key_file = tmp_path / "state" / "assertion-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # Plain X-Forwarded-* headers only when asked for (forward.user_headers).
    assert not any(k.startswith("x-forwarded-user") for k, _ in last_headers(upstream))


async def test_the_key_is_kept_across_restarts(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    first = await served_keys(await make_proxy(extra="forward: {assertion: true}\n"))
    second = await served_keys(await make_proxy(extra="forward: {assertion: true}\n"))
    assert first == second


async def test_a_configured_rsa_key_and_custom_header(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "assert.pem").write_bytes(pem)
    extra = """
forward:
  user_headers: true
  assertion: {key_file: assert.pem, header: X-Replay-Identity, ttl: 2m, audience: replay}
"""
    proxy = await make_proxy(extra=extra)
    spoofed = {"X-Replay-Identity": "forged", "X-Forwarded-Email": "root@example.test"}
    r = await proxy.get("/dashboard", headers={**bearer("bob"), **spoofed})
    assert r.status == 200
    seen = dict(last_headers(upstream))
    jwks = await served_keys(proxy)
    assert jwks["keys"][0]["alg"] == "RS256"
    claims = verify(seen["x-replay-identity"], jwks, audience="replay")
    assert claims["sub"] == "bob" and claims["exp"] - claims["iat"] == 120
    assert seen["x-forwarded-user"] == "bob"
    assert "x-forwarded-email" not in seen  # bob's token has no email: the spoof is gone


async def test_no_identity_no_assertion(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy(extra="forward: {assertion: true}\n")
    r = await proxy.get("/healthz", headers={"X-Jitgate-Assertion": "forged"})
    assert r.status == 200
    assert not any(k == HEADER for k, _ in last_headers(upstream))


async def test_the_jwks_endpoint_is_absent_when_assertions_are_off(proxy: TestClient) -> None:
    assert (await proxy.get("/_jit/.well-known/jwks.json")).status == 404


def _settings(tmp_path: Path, **over: Any) -> AssertionSettings:
    base: dict[str, Any] = {
        "key_file": tmp_path / "k.pem",
        "generate": True,
        "audience": "http://up",
        "ttl": 60.0,
    }
    return AssertionSettings(**{**base, **over})


def test_an_assertion_is_reused_until_half_its_life_is_gone(tmp_path: Path) -> None:
    signer = AssertionSigner.from_settings(_settings(tmp_path))
    alice = Identity("alice", ("eng",), "alice@example.test")
    first = signer.sign(alice, now=1000.0)
    assert signer.sign(alice, now=1029.0) == first
    assert signer.sign(Identity("alice", ("eng", "sre")), now=1029.0) != first
    later = signer.sign(alice, now=1031.0)
    assert later != first
    claims = jwt.decode(later, options={"verify_signature": False})
    assert (claims["iat"], claims["exp"]) == (1031, 1091)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), "EC P-256 key or an RSA key"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), r"2048\+ bits"),
    ],
)
def test_unfit_keys_are_refused(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(
        make().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(AssertionKeyError, match=message) as err:
        load_or_create_key(path, generate=False)
    assert "forward.assertion.key_file" in str(err.value)


def test_assertion_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        f"upstream: {{url: 'http://127.0.0.1:8081'}}\n"
        f"identity: {{hs_secret: {'s' * 32}}}\n"
        "forward:\n"
        "  assertion: {ttl: 10m, key_file: missing.pem, header: X_Identity}\n"
    )
    with pytest.raises(ConfigErrors) as err:
        load(cfg, environ={})
    text = str(err.value)
    assert f"{cfg}:4: forward.assertion.ttl: must be at most 300 seconds" in text
    assert "forward.assertion.key_file: no such file" in text
    assert "forward.assertion.header: 'X_Identity' is not a header name" in text


def test_assertion_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        "upstream: {url: 'http://10.0.0.5:8000/'}\n"
        f"identity: {{hs_secret: {'s' * 32}}}\n"
        "state_dir: st\nforward: {assertion: {}}\n"
    )
    a = load(cfg, environ={}).forward.assertion
    assert a is not None
    assert (a.header, a.ttl, a.audience, a.issuer) == (
        "X-Jitgate-Assertion", 60.0, "http://10.0.0.5:8000", "jitgate",
    )  # fmt: skip
    assert a.key_file == tmp_path / "st" / "assertion-key.pem" and a.generate
    assert load(ROOT / "config" / "jitgate.yaml", environ={}).forward.assertion is None
