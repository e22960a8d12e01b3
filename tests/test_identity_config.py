"""Identity settings: the example config of each mode loads, and mistakes name their field."""

from __future__ import annotations

import json
import re
from ipaddress import ip_network
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from cryptography.fernet import Fernet

from proxy.errors import ConfigErrors
from proxy.identity import Verifier, keyset
from proxy.settings import load
from proxy.settings.identity import JWKS_ALGORITHMS


def test_jwks_example_is_valid() -> None:
    s = load(ROOT / "config" / "identity-jwks.example.yaml", environ={})
    keycloak, auth0 = s.identity.issuers
    assert keycloak.jwks_uri is None and keycloak.groups_claim == "realm_access.roles"
    assert auth0.audience == ("https://jitgate.example.com", "jitgate")
    assert auth0.groups_claim == ("https://example.com/groups",)
    assert s.identity.algorithms == () and s.identity.hs_secret is None  # no local keys
    assert s.identity.jwks_min_refetch_interval == 30 and s.identity.jwks_max_age == 3600
    assert s.forward.assertion is not None and s.forward.assertion.ttl == 60
    assert s.identity.dev_key is None


def test_trusted_headers_example_is_valid() -> None:
    s = load(ROOT / "config" / "identity-trusted-headers.example.yaml", environ={})
    t = s.identity.trusted_headers
    assert t is not None and t.sources == (ip_network("10.20.0.0/24"),)
    assert (t.user, t.email, t.groups, t.assertion) == (
        "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", None,
    )  # fmt: skip
    assert s.identity.issuers == () and s.forward.user_headers


def test_sso_assertion_example_is_valid() -> None:
    s = load(ROOT / "config" / "identity-sso-assertion.example.yaml", environ={})
    t = s.identity.trusted_headers
    assert t is not None and t.assertion is not None
    assert t.assertion_header == "X-Pomerium-Jwt-Assertion"
    assert t.assertion.issuer == "authenticate.example.com"  # a host name: jwks_uri given
    assert t.assertion.algorithms == ("ES256",)


@pytest.mark.parametrize(
    "name", ["identity-jwks", "identity-trusted-headers", "identity-sso-assertion"]
)
async def test_each_example_builds_a_verifier(name: str) -> None:
    s = load(ROOT / "config" / f"{name}.example.yaml", environ={})
    v = Verifier(s.identity)  # builds the key sets; fetching waits for warm_up
    await v.close()


def test_jwks_algorithms_match_what_proxy_jwks_verifies() -> None:
    assert frozenset(JWKS_ALGORITHMS) == keyset.SUPPORTED_ALGORITHMS


MISTAKES = [
    ("issuers: [{issuer: 'http://login.example.com', audience: j}]",
     "identity.issuers[0].issuer: must use https (http only on a loopback address)"),
    ("issuers: [{issuer: 'https://a.test', audience: j, jwks_uri: 'http://keys.test/jwks'}]",
     "identity.issuers[0].jwks_uri: must use https"),
    ("issuers: [{issuer: 'https://a.test', audience: j, algorithms: [HS256]}]",
     "identity.issuers[0].algorithms: unsupported algorithm 'HS256' (an HMAC secret cannot"),
    ("issuers: [{issuer: 'https://a.test', audience: j, algorithms: [none]}]",
     "identity.issuers[0].algorithms: unsupported algorithm 'none'"),
    ("issuers: [{issuer: 'https://a.test'}]", "identity.issuers[0].audience: is required"),
    ("issuers: [{issuer: 'https://a.test', audience: j}, {issuer: 'https://a.test', audience: k}]",
     "identity.issuers[1].issuer: 'https://a.test' is listed twice"),
    ("issuers: [{issuer: 'login.example.com', audience: j, jwks_uri: 'https://k.test/j'}]",
     "identity.issuers[0].issuer: must be an http(s) URL"),
    ("issuers: [{issuer: 'https://a.test', audience: j, kid: x}]",
     "identity.issuers[0].kid: unknown field"),
    ("issuers: {issuer: 'https://a.test'}", "identity.issuers: must be a list"),
    ("jwks_min_refetch_interval: 0", "identity.jwks_min_refetch_interval: duration must be"),
    ("trusted_headers: {user: X-User}", "identity.trusted_headers.from: is required"),
    ("trusted_headers: {from: [0.0.0.0/0]}",
     "identity.trusted_headers.from: '0.0.0.0/0' would trust every client"),
    ("trusted_headers: {from: ['10.0.0.1/8']}",
     "identity.trusted_headers.from: '10.0.0.1/8' is not a CIDR: 10.0.0.1/8 has host bits set"),
    ("trusted_headers: {from: [10.0.0.0/8], user: X_User}",
     "identity.trusted_headers.user: 'X_User' is not a header name"),
    ("trusted_headers: {from: [10.0.0.0/8], assertion: {header: X-A, issuer: pomerium.test,"
     " audience: j}}",
     "identity.trusted_headers.assertion.jwks_uri: is required when the issuer is not a URL"),
    ("trusted_headers: {from: [10.0.0.0/8], assertion: {issuer: 'https://a.test', audience: j}}",
     "identity.trusted_headers.assertion.header: is required"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), MISTAKES)
def test_identity_mistakes_name_the_field(tmp_path: Path, line: str, message: str) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(f"upstream: {{url: 'http://127.0.0.1:8081'}}\nidentity:\n  {line}\n")
    with pytest.raises(ConfigErrors) as err:
        load(cfg, environ={})
    assert f"{cfg}:3: {message}" in str(err.value)


def test_a_local_issuer_cannot_also_be_a_jwks_issuer(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:8081'}\n"
        f"identity:\n  hs_secret: {'s' * 32}\n  issuer: 'https://a.test'\n"
        "  issuers: [{issuer: 'https://a.test', audience: j}]\n"
    )
    message = "identity.issuer: 'https://a.test' is also in identity.issuers"
    with pytest.raises(ConfigErrors, match=re.escape(message)):
        load(cfg, environ={})


def test_loopback_http_is_allowed_and_local_keys_become_optional(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:8081'}\n"
        "identity:\n  issuers: [{issuer: 'http://127.0.0.1:9000', audience: [a, b]}]\n"
    )
    s = load(cfg, environ={}).identity
    assert s.issuers[0].audience == ("a", "b") and s.issuers[0].algorithms == ("RS256",)
    assert s.algorithms == ()  # no hs_secret needed
    # Without issuers or trusted headers the local keys are still required.
    cfg.write_text("upstream: {url: 'http://127.0.0.1:8081'}\n")
    with pytest.raises(ConfigErrors, match=re.escape("identity.hs_secret: is required")):
        load(cfg, environ={})


def test_forward_underscore_switch_and_user_headers(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        f"upstream: {{url: 'http://127.0.0.1:8081'}}\nidentity: {{hs_secret: {'s' * 32}}}\n"
        "forward: {reject_underscore_headers: false, user_headers: true, assertion: false}\n"
    )
    fwd = load(cfg, environ={}).forward
    assert not fwd.reject_underscore_headers and fwd.user_headers and fwd.assertion is None
    assert load(ROOT / "config" / "jitgate.yaml", environ={}).forward.reject_underscore_headers


KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()
OIDC_ENV = {
    "JITGATE_IDENTITY__OIDC__CLIENT_SECRET": "s3cret-from-env",
    "JITGATE_IDENTITY__SESSION__KEYS": f"[{KEY_A}, {KEY_B}]",
}


def test_oidc_example_is_valid_with_secrets_from_the_environment() -> None:
    s = load(ROOT / "config" / "identity-oidc.example.yaml", environ=OIDC_ENV)
    o, sess = s.identity.oidc, s.identity.session
    assert o is not None and sess is not None
    assert o.redirect_uri == "https://jitgate.example.com/_jit/oidc/callback"
    assert o.client_secret is not None and o.client_secret.reveal() == "s3cret-from-env"
    assert "s3cret" not in repr(o)
    assert o.extra_auth_params == (("prompt", "select_account"),)
    assert [k.reveal() for k in sess.keys] == [KEY_A, KEY_B]
    assert (sess.max_age, sess.idle_timeout, sess.secure, sess.store) == (
        8 * 3600, 3600, True, "cookie",
    )  # fmt: skip
    assert s.identity.cookie is None and s.identity.algorithms == ()


def test_oidc_example_without_session_keys_names_the_field() -> None:
    with pytest.raises(ConfigErrors) as exc:
        load(ROOT / "config" / "identity-oidc.example.yaml", environ={})
    assert "identity.session.keys: is required with identity.oidc" in str(exc.value)


OIDC = {"issuer": "https://idp.example", "client_id": "c", "public_url": "https://j.example"}


@pytest.mark.parametrize(
    ("oidc", "session", "message"),
    [
        ("", "keys: [not-a-key]", "identity.session.keys[0]: must be a Fernet key"),
        ("", "secure: false", "identity.session.secure: may be false only"),
        ("public_url: 'http://j.example'", "", "identity.oidc.public_url: must use https"),
        ("public_url: 'https://j.example/x'", "", "without path or query"),
        ("public_url: 'http://127.0.0.1:8080'", "", "identity.session.secure: must be false"),
        ("scopes: [email]", "", "identity.oidc.scopes: must include openid"),
        ("redirect_path: /cb", "", "identity.oidc.redirect_path: must be a path under"),
        ("extra_auth_params: {state: x}", "", "state is set by jitgate"),
        ("issuer: 'http://idp.example'", "", "identity.oidc.issuer: must use https"),
        ("client_id: ''", "", "identity.oidc.client_id: is required"),
        ("", "store: memcached", "identity.session.store: must be one of cookie, redis"),
        ("", "max_age: 1h, idle_timeout: 2h", "must not exceed identity.session.max_age"),
        ("client_secret: 1234", "", "identity.oidc.client_secret: must be a string"),
    ],
)
def test_oidc_mistakes_name_their_field(
    tmp_path: Path, oidc: str, session: str, message: str
) -> None:
    cfg = tmp_path / "jitgate.yaml"
    (tmp_path / "policy.yaml").write_text((ROOT / "config" / "policy.yaml").read_text())
    oidc_fields = {**OIDC, **yaml.safe_load("{" + oidc + "}")}
    session_fields = {"keys": [KEY_A], **yaml.safe_load("{" + session + "}")}
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\n"
        f"identity:\n  oidc: {json.dumps(oidc_fields)}\n  session: {json.dumps(session_fields)}\n"
    )
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    assert message in str(exc.value)
    assert "1234" not in str(exc.value) and "not-a-key" not in str(exc.value)
