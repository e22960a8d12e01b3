"""JWT verification: the accepted cases and a table of rejections."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import AUDIENCE, ISSUER, SECRET, make_token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from waiting import past

from proxy.identity import Identity, IdentityError, MintError, Verifier, mint
from proxy.identity.keyset import REASON_CODES
from proxy.settings.identity import IdentitySettings
from proxy.settings.read import Secret

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_public(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.fixture
def verifier(tmp_path: Path) -> Verifier:
    rsa_pub = tmp_path / "rsa.pem"
    rsa_pub.write_bytes(pem_public(RSA_KEY))
    ec_pub = tmp_path / "ec.pem"
    ec_pub.write_bytes(pem_public(EC_KEY))
    return Verifier(
        IdentitySettings(
            algorithms=("HS256", "RS256", "ES256"),
            hs_secret=Secret(SECRET),
            public_key_files=(rsa_pub, ec_pub),
            issuer=ISSUER,
            audience=AUDIENCE,
            leeway=0,
        )
    )


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], sig: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(sig)])


async def test_accepts_hs256_rs256_es256(verifier: Verifier) -> None:
    groups = {"groups": ["eng", "support"]}
    for token in (
        jwt.encode(claims(**groups), SECRET, algorithm="HS256"),
        jwt.encode(claims(**groups), RSA_KEY, algorithm="RS256"),
        jwt.encode(claims(**groups), EC_KEY, algorithm="ES256"),
    ):
        assert await verifier.verify(token) == Identity("alice", ("eng", "support"))


async def test_groups_as_a_delimited_string(verifier: Verifier) -> None:
    token = jwt.encode(claims(groups="eng, sre ops"), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).groups == ("eng", "sre", "ops")


REJECTIONS: list[tuple[str, Any, str]] = [
    ("expired", lambda: jwt.encode(claims(exp=int(time.time()) - 5), SECRET), "expired"),
    (
        "nbf in the future",
        lambda: jwt.encode(claims(nbf=int(time.time()) + 300), SECRET),
        "not yet valid",
    ),
    ("wrong audience", lambda: jwt.encode(claims(aud="other"), SECRET), "audience"),
    ("wrong issuer", lambda: jwt.encode(claims(iss="evil"), SECRET), "unknown issuer evil"),
    # The issuer is named before the algorithm is looked at (found by tests/jwtattack.py).
    (
        "wrong issuer, algorithm not allowed",
        lambda: jwt.encode(claims(iss="evil"), RSA_KEY, algorithm="RS512"),
        "unknown issuer evil",
    ),
    ("no exp", lambda: jwt.encode(claims(exp=None), SECRET), "'exp'"),
    ("no sub", lambda: jwt.encode(claims(sub=None), SECRET), "'sub'"),
    ("wrong hs key", lambda: jwt.encode(claims(), "x" * 40), "signature"),
    ("wrong rsa key", lambda: jwt.encode(claims(), OTHER_RSA, algorithm="RS256"), "signature"),
    ("alg none", lambda: unsigned({"alg": "none", "typ": "JWT"}, claims()), "'none'"),
    ("alg None", lambda: unsigned({"alg": "None"}, claims()), "not allowed"),
    (
        "HS256 signed with the RS256 public key as secret",
        lambda: _hmac_with_public_key(),
        "signature",
    ),
    ("RS512 not allowed", lambda: jwt.encode(claims(), RSA_KEY, algorithm="RS512"), "not allowed"),
    ("garbage", lambda: "a.b.c", "malformed"),
    ("oversize", lambda: jwt.encode(claims(pad="x" * 9000), SECRET), "too large"),
    (
        "tampered payload",
        lambda: _tamper(jwt.encode(claims(), SECRET)),
        "signature",
    ),
]


def _hmac_with_public_key() -> str:
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    sig = hmac.new(pem_public(RSA_KEY), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


def _tamper(token: str) -> str:
    header, _, sig = token.split(".")
    return ".".join([header, b64(json.dumps(claims(sub="admin")).encode()), sig])


@pytest.mark.parametrize(("case", "make", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejections(verifier: Verifier, case: str, make: Any, reason: str) -> None:
    with pytest.raises(IdentityError) as exc:
        await verifier.verify(make())
    assert reason in str(exc.value), case
    assert exc.value.code in REASON_CODES and exc.value.code != "no_credentials", case


def test_reason_codes_are_one_list_in_code_schema_and_docs() -> None:
    """Every code the identity package gives is listed, and the schema and docs list those."""
    root = Path(__file__).resolve().parent.parent
    given: set[str] = set()
    for path in (root / "proxy" / "identity").glob("*.py"):
        text = path.read_text()
        given |= set(re.findall(r'Error\([^()]*(?:\([^()]*\)[^()]*)*, "([a-z_]+)"\)', text))
        given |= set(re.findall(r'(?:code|_[A-Z_]+) = "([a-z_]+)"', text))
    given |= {"no_credentials", "token_invalid"}  # NOBODY's, and the default
    assert given == REASON_CODES
    schema = json.loads((root / "config" / "audit-record.schema.json").read_text())
    assert set(schema["properties"]["reason_code"]["enum"]) == REASON_CODES
    documented = set(
        re.findall(r"^\| `([a-z_]+)` \|", (root / "docs" / "identity.md").read_text(), re.M)
    )
    assert documented >= REASON_CODES


def test_token_sources(verifier: Verifier) -> None:
    token = make_token()
    assert verifier.token_from({"Authorization": f"Bearer {token}"}, {}) == token
    assert verifier.token_from({"Authorization": f"bearer  {token}"}, {}) == token
    assert verifier.token_from({}, {"jitgate_token": token}) == token
    assert verifier.token_from({"Authorization": "Basic abc"}, {}) is None
    assert verifier.token_from({}, {}) is None


def test_cookie_only_when_bearer_disabled() -> None:
    v = Verifier(IdentitySettings(bearer=False, cookie="c", hs_secret=Secret(SECRET)))
    assert v.token_from({"Authorization": "Bearer x"}, {}) is None
    assert v.token_from({}, {"c": "y"}) == "y"


async def test_mint_signs_with_dev_key_and_verifies() -> None:
    s = IdentitySettings(
        hs_secret=Secret(SECRET), dev_key=Secret(SECRET), issuer=ISSUER, audience=AUDIENCE
    )
    token = mint(s, "alice", groups=("eng",), ttl=60)
    assert await Verifier(s).verify(token) == Identity("alice", ("eng",))
    assert jwt.decode(token, options={"verify_signature": False})["exp"] <= time.time() + 61


async def test_mint_with_rsa_dev_key_file(tmp_path: Path) -> None:
    priv = tmp_path / "dev.pem"
    priv.write_bytes(
        RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub = tmp_path / "pub.pem"
    pub.write_bytes(pem_public(RSA_KEY))
    s = IdentitySettings(algorithms=("RS256",), public_key_files=(pub,), dev_key_file=priv)
    assert (await Verifier(s).verify(mint(s, "bob"))).subject == "bob"


def test_mint_refuses_without_dev_key() -> None:
    with pytest.raises(MintError, match="no dev signing key"):
        mint(IdentitySettings(hs_secret=Secret(SECRET)), "alice")


async def test_verified_token_cache_rechecks_exp(verifier: Verifier) -> None:
    token = jwt.encode(claims(exp=int(time.time()) + 2), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).subject == "alice"
    assert (await verifier.verify(token)).subject == "alice"  # from the cache
    await past(jwt.decode(token, options={"verify_signature": False})["exp"])
    with pytest.raises(IdentityError, match="expired"):
        await verifier.verify(token)


async def test_cache_is_bounded(tmp_path: Path) -> None:
    v = Verifier(IdentitySettings(hs_secret=Secret(SECRET), cache_size=3))
    for i in range(10):
        await v.verify(jwt.encode({"sub": f"u{i}", "exp": int(time.time()) + 60}, SECRET))
    assert len(v._cache) == 3


async def test_cache_does_not_accept_a_tampered_copy(verifier: Verifier) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    await verifier.verify(token)
    with pytest.raises(IdentityError):
        await verifier.verify(_tamper(token))


async def test_subject_and_groups_from_configured_claims() -> None:
    v = Verifier(
        IdentitySettings(
            hs_secret=Secret(SECRET), subject_claim="email", groups_claim="roles", leeway=0
        )
    )
    token = jwt.encode(
        {"email": "a@example.com", "sub": "123", "roles": ["approver"], "groups": ["x"],
         "exp": int(time.time()) + 60},
        SECRET,
    )  # fmt: skip
    assert await v.verify(token) == Identity("a@example.com", ("approver",), "a@example.com")
    no_email = jwt.encode({"sub": "123", "exp": int(time.time()) + 60}, SECRET)
    with pytest.raises(IdentityError, match="'email'"):
        await v.verify(no_email)
