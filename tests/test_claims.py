"""Claim mapping: nested paths, claim names with dots, delimited groups and aliases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import SECRET, ProxyFactory, Upstream
from cryptography.hazmat.primitives.asymmetric import rsa
from idp import Idp, idp_fixture
from jwtkit import key_server

from proxy.errors import ConfigErrors
from proxy.identity import Identity, IdentityError, Verifier, claims, mint
from proxy.settings import load
from proxy.settings.identity import IdentitySettings, IssuerSettings
from proxy.settings.read import Secret

# This module's IdP names groups the way a corporate directory would.
idp = idp_fixture("idp", scope="module", groups={"alice": ["okta-eng", "okta-support", "x"]})
ISSUER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

KEYCLOAK_LIKE = {
    "sub": "f81d4fae",
    "realm_access": {"roles": ["okta-eng", "offline_access"]},
    "resource_access": {"my.client": {"roles": ["viewer"]}},
    "https://example.com/email": "ann@example.test",
    "profile": {"id": "ann"},
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("sub", "f81d4fae"),
        ("realm_access.roles", ["okta-eng", "offline_access"]),
        (("resource_access", "my.client", "roles"), ["viewer"]),  # a key with a dot in it
        (("https://example.com/email",), "ann@example.test"),
        ("resource_access.my.client.roles", None),  # the dotted string splits "my.client"
        ("realm_access.roles.0", None),  # lists are not indexed
        ("sub.x", None),  # a string has no members
        ("missing.deeper", None),
    ],
)
def test_lookup(path: claims.ClaimPath, value: Any) -> None:
    assert claims.lookup(KEYCLOAK_LIKE, path) == value


@pytest.mark.parametrize(
    ("value", "delimiter", "groups"),
    [
        (["eng", "sre"], None, ("eng", "sre")),
        (["eng", 7, "", None, "sre"], None, ("eng", "sre")),  # non-strings are dropped
        ("eng, sre ops", None, ("eng", "sre", "ops")),  # default: commas or whitespace
        ("Support Leads;eng ; ;sre", ";", ("Support Leads", "eng", "sre")),
        ("a|b", "|", ("a", "b")),
        ({"eng": True}, None, ()),  # never a guess
        (42, None, ()),
        (None, None, ()),
    ],
)
def test_split_groups(value: Any, delimiter: str | None, groups: tuple[str, ...]) -> None:
    assert claims.split_groups(value, delimiter) == groups


def test_aliases_rename_and_deduplicate() -> None:
    table = {"okta-eng": "eng", "github:acme/eng": "eng", "okta-support": "support"}
    groups = ("okta-eng", "ops", "github:acme/eng", "okta-support")
    assert claims.alias(groups, table) == ("eng", "ops", "support")


def verifier(**over: Any) -> Verifier:
    return Verifier(IdentitySettings(hs_secret=Secret(SECRET), leeway=0, **over))


def token(payload: dict[str, Any]) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **payload}, SECRET, "HS256")


async def test_nested_paths_and_keys_with_dots() -> None:
    v = verifier(
        subject_claim="profile.id",
        email_claim=("https://example.com/email",),
        groups_claim="realm_access.roles",
        group_aliases=(("okta-eng", "eng"),),
    )
    ident = await v.verify(token(KEYCLOAK_LIKE))
    assert ident == Identity("ann", ("eng", "offline_access"), "ann@example.test")
    other = verifier(groups_claim=("resource_access", "my.client", "roles"))
    assert (await other.verify(token(KEYCLOAK_LIKE))).groups == ("viewer",)


async def test_delimited_string_groups() -> None:
    v = verifier(groups_delimiter=";", group_aliases=(("okta-eng", "eng"),))
    ident = await v.verify(token({"sub": "ann", "groups": "okta-eng;Support Leads; ops"}))
    assert ident.groups == ("eng", "Support Leads", "ops")


async def test_a_missing_or_odd_subject_is_refused() -> None:
    v = verifier(subject_claim="profile.id")
    with pytest.raises(IdentityError, match=r"claim 'profile\.id' must be a non-empty string"):
        await v.verify(token({"sub": "ann", "profile": {"id": ["ann"]}}))
    with pytest.raises(IdentityError, match="control characters"):
        await verifier().verify(token({"sub": "ann\r\nX-Forwarded-User: root"}))
    with pytest.raises(IdentityError, match="control characters"):
        await verifier().verify(token({"sub": "ann", "groups": ["eng\nadmin"]}))


async def test_mint_writes_nested_claims_the_verifier_reads() -> None:
    s = IdentitySettings(
        hs_secret=Secret(SECRET),
        dev_key=Secret(SECRET),
        subject_claim="profile.id",
        groups_claim=("https://example.com/groups",),
    )
    minted = mint(s, "ann", groups=("eng",), email="ann@example.test")
    raw = jwt.decode(minted, options={"verify_signature": False})
    assert raw["profile"] == {"id": "ann"} and raw["https://example.com/groups"] == ["eng"]
    assert await Verifier(s).verify(minted) == Identity("ann", ("eng",), "ann@example.test")


async def test_each_issuer_has_its_own_claim_paths() -> None:
    async with key_server() as ks:
        ks.add_key("k1", ISSUER_KEY)
        s = IdentitySettings(
            algorithms=(),
            issuers=(
                IssuerSettings(
                    ks.url, ("jitgate",), jwks_uri=ks.jwks_uri, groups_claim="realm_access.roles"
                ),
            ),
            group_aliases=(("okta-eng", "eng"),),
        )
        v = Verifier(s)
        try:
            ident = await v.verify(ks.token("jitgate", **KEYCLOAK_LIKE))
        finally:
            await v.close()
    # Subject and email fall back to the identity-wide paths; groups are the issuer's.
    assert ident == Identity("f81d4fae", ("eng", "offline_access"), None)


async def test_real_idp_groups_are_aliased_on_the_way_upstream(
    make_proxy: ProxyFactory, upstream: Upstream, idp: Idp
) -> None:
    extra = f"""
identity:
  issuers: [{{issuer: "{idp.issuer}", audience: jitgate}}]
  group_aliases: {{okta-eng: eng, okta-support: support}}
forward: {{user_headers: true}}
"""
    proxy = await make_proxy(extra=extra)
    tokens = await idp.login("alice")
    assert tokens.id_claims["groups"] == ["okta-eng", "okta-support", "x"]
    r = await proxy.get("/dashboard", headers={"Authorization": f"Bearer {tokens.id_token}"})
    assert r.status == 200, await r.text()
    seen = {k.lower(): v for k, v in upstream.hits[-1][2].items()}
    assert seen["x-forwarded-groups"] == "eng,support,x"
    assert seen["x-forwarded-email"] == "alice@example.test"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("groups_claim: https://example.com/groups",
         "identity.groups_claim: 'https://example.com/groups' would be split at its dots"),
        ("subject_claim: a..b", "identity.subject_claim: 'a..b' is not a dotted claim path"),
        ("email_claim: []", "identity.email_claim: must be a dotted path"),
        ("groups_claim: {a: b}", "identity.groups_claim: must be a dotted path"),
        ("groups_delimiter: ''", "identity.groups_delimiter: must not be empty"),
        ("group_aliases: [eng]", "identity.group_aliases: must map group names to names"),
    ],
)  # fmt: skip
def test_claim_config_errors_name_the_field(tmp_path: Path, line: str, message: str) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        f"upstream: {{url: 'http://127.0.0.1:8081'}}\nidentity:\n  hs_secret: {'s' * 32}\n"
        f"  {line}\n"
    )
    with pytest.raises(ConfigErrors) as err:
        load(cfg, environ={})
    assert f"{cfg}:4: {message}" in str(err.value)


def test_claim_paths_load_as_written(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:8081'}\n"
        f"identity:\n  hs_secret: {'s' * 32}\n"
        "  groups_claim: realm_access.roles\n"
        "  email_claim: ['https://example.com/email']\n"
        "  group_aliases: {okta-eng: eng}\n"
    )
    s = load(cfg, environ={}).identity
    assert s.groups_claim == "realm_access.roles"
    assert s.email_claim == ("https://example.com/email",)
    assert s.subject_claim == "sub" and s.group_aliases == (("okta-eng", "eng"),)
