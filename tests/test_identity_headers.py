"""Identity headers: spoofed copies never reach the upstream; an SSO proxy's are believed
only from its addresses (the TCP peer, never X-Forwarded-For).

The test client connects from 127.0.0.1, so `from: [127.0.0.1/32]` makes it the SSO
proxy and `from: [10.0.0.0/8]` makes it an ordinary client. Every assertion about what
was forwarded is made at the real upstream, on the headers it received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import ip_network

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import AUDIENCE, ISSUER, SECRET, ProxyFactory, Upstream, bearer
from cryptography.hazmat.primitives.asymmetric import ec
from jwtkit import KeyServer, key_server

from proxy.identity import Verifier
from proxy.settings.identity import IdentitySettings, TrustedHeadersSettings
from proxy.settings.read import Secret
from proxy.state import STATE

IDENTITY_ROUTE = "/dashboard"  # matches no route: the policy's default is identity
PUBLIC_ROUTE = "/healthz"
SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
POMERIUM_KEY = ec.generate_private_key(ec.SECP256R1())
ROGUE_KEY = ec.generate_private_key(ec.SECP256R1())
POMERIUM_ISS = "authenticate.example.test"  # Pomerium's iss and aud are host names
POMERIUM_AUD = "jitgate.example.test"

LOCAL = f"""
  algorithms: [HS256]
  hs_secret: {SECRET}
  issuer: {ISSUER}
  audience: {AUDIENCE}
  group_aliases: {{okta-eng: eng}}
"""


def trusted(sources: str, assertion_jwks: str | None = None, forward: str = "") -> str:
    """An identity section: the local test keys plus an SSO proxy trusted from `sources`."""
    text = f"""
identity:
{LOCAL}
  trusted_headers:
    from: {sources}
    user: X-Auth-Request-User
    email: X-Auth-Request-Email
    groups: X-Auth-Request-Groups
"""
    if assertion_jwks is not None:
        text += f"""
    assertion:
      header: X-Pomerium-Jwt-Assertion
      issuer: {POMERIUM_ISS}
      audience: {POMERIUM_AUD}
      algorithms: [ES256]
      jwks_uri: "{assertion_jwks}"
"""
    return text + (forward or "\nforward: {user_headers: true, assertion: true}\n")


SSO = {
    "X-Auth-Request-User": "carol",
    "X-Auth-Request-Email": "carol@example.test",
    "X-Auth-Request-Groups": "okta-eng,support",
}


def received(upstream: Upstream) -> dict[str, str]:
    """The headers of the upstream's last request, names in lower case."""
    return {k.lower(): v for k, v in upstream.hits[-1][2].items()}


@pytest.fixture
async def pomerium() -> AsyncIterator[KeyServer]:
    async with key_server(issuer=POMERIUM_ISS) as ks:
        ks.add_key("pomerium-1", POMERIUM_KEY)
        yield ks


# --- spoofed copies -----------------------------------------------------------------------

SPOOFED = [
    "X-Forwarded-User",
    "x-forwarded-user",
    "X-FORWARDED-EMAIL",
    "X-Forwarded-Groups",
    "X-Jitgate-User",
    "X-Jitgate-Assertion",
    "x-jitgate-assertion",
    "X-Auth-Request-User",  # the trusted-header names...
    "x-auth-request-email",
    "X-AUTH-REQUEST-GROUPS",
    "X-Pomerium-Jwt-Assertion",  # ...and the SSO proxy's assertion
]


@pytest.mark.parametrize("name", SPOOFED)
async def test_a_spoofed_identity_header_never_reaches_the_upstream(
    make_proxy: ProxyFactory, upstream: Upstream, pomerium: KeyServer, name: str
) -> None:
    # 127.0.0.1 is not an SSO proxy here: every identity header it sends is a client's.
    proxy = await make_proxy(extra=trusted("[10.0.0.0/8]", pomerium.jwks_uri))
    spoof = "spoofed-admin"
    r = await proxy.get(IDENTITY_ROUTE, headers={**bearer("alice"), name: spoof})
    assert r.status == 200, await r.text()
    seen = received(upstream)
    assert spoof not in seen.values()
    assert "authorization" not in seen
    # Where jitgate sets a header itself, the upstream has exactly jitgate's value.
    assert seen["x-forwarded-user"] == "alice"
    claims = jwt.decode(seen["x-jitgate-assertion"], options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert not any(k.startswith(("x-auth-request", "x-pomerium")) for k in seen)

    # A public route: no identity to vouch for, and the client's copy is still removed.
    r = await proxy.get(PUBLIC_ROUTE, headers={name: spoof})
    assert r.status == 200
    seen = received(upstream)
    assert spoof not in seen.values()
    assert "x-forwarded-user" not in seen and "x-jitgate-assertion" not in seen


UNDERSCORED = [
    "X_Forwarded_User",
    "x_forwarded_email",
    "X-Forwarded_Groups",
    "X_Jitgate_Assertion",
    "X_Auth_Request_User",
    "X_Pomerium_Jwt_Assertion",
    "X_Anything_Else",
]


@pytest.mark.parametrize("name", UNDERSCORED)
async def test_a_header_name_with_an_underscore_is_refused(
    make_proxy: ProxyFactory, upstream: Upstream, name: str
) -> None:
    proxy = await make_proxy(extra=trusted("[127.0.0.1/32]", None))
    for path in (IDENTITY_ROUTE, PUBLIC_ROUTE):
        r = await proxy.get(path, headers={**bearer("alice"), name: "admin"})
        assert r.status == 400
        assert "'_'" in await r.text()
    assert upstream.hits == []


async def test_underscores_on_the_wire_are_refused(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # Raw bytes, so no client library can respell the name on the way.
    proxy = await make_proxy(extra=trusted("[127.0.0.1/32]", None))
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        b"GET /dashboard HTTP/1.1\r\nHost: jitgate\r\nX_Auth_Request_User: root\r\n"
        b"Connection: close\r\n\r\n"
    )
    status = (await reader.read()).split(b"\r\n", 1)[0]
    writer.close()
    assert status == b"HTTP/1.1 400 Bad Request"
    assert upstream.hits == []


async def test_with_underscores_allowed_their_spellings_are_still_stripped(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    forward = "\nforward: {reject_underscore_headers: false, user_headers: true}\n"
    proxy = await make_proxy(extra=trusted("[10.0.0.0/8]", None, forward))
    spoofed = {"X_Forwarded_User": "root", "x_auth_request_user": "root", "X_Jitgate_User": "root"}
    r = await proxy.get(IDENTITY_ROUTE, headers={**bearer("alice"), **spoofed})
    assert r.status == 200
    seen = received(upstream)
    assert "root" not in seen.values()
    assert not any("_" in k for k in seen)
    assert seen["x-forwarded-user"] == "alice"


# --- trusted headers ----------------------------------------------------------------------


async def test_trusted_headers_from_an_allowed_peer_are_the_identity(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(extra=trusted("[127.0.0.1/32]"))
    r = await proxy.get(IDENTITY_ROUTE, headers=SSO)
    assert r.status == 200, await r.text()
    seen = received(upstream)
    # jitgate forwards the identity it took, not the SSO proxy's headers.
    assert seen["x-forwarded-user"] == "carol"
    assert seen["x-forwarded-email"] == "carol@example.test"
    assert seen["x-forwarded-groups"] == "eng,support"  # okta-eng through group_aliases
    assert not any(k.startswith("x-auth-request") for k in seen)
    # A protected route needs carol's grant, like any identity's.
    assert (await proxy.get(SNAPSHOTS, headers=SSO)).status == 403
    await proxy.app[STATE].grants.add("carol", "recording:1/demo-1", 60, "test", "pytest")
    assert (await proxy.get(SNAPSHOTS, headers=SSO)).status == 200
    # Without the SSO headers, a bearer token still works from the same peer.
    assert (await proxy.get(IDENTITY_ROUTE, headers=bearer("dave"))).status == 200
    assert received(upstream)["x-forwarded-user"] == "dave"


async def test_trusted_headers_from_another_peer_are_ignored_and_stripped(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(extra=trusted("[10.0.0.0/8]"))
    # X-Forwarded-For is no way in: only the TCP peer counts.
    r = await proxy.get(IDENTITY_ROUTE, headers={**SSO, "X-Forwarded-For": "10.1.2.3"})
    assert r.status == 401
    reasons = (await r.json())["reasons"]
    assert "X-Auth-Request-User ignored: peer 127.0.0.1 is not in" in reasons[0]
    assert upstream.hits == []
    r = await proxy.get(PUBLIC_ROUTE, headers=SSO)
    assert r.status == 200
    seen = received(upstream)
    assert not any(k.startswith("x-auth-request") for k in seen)
    assert "x-forwarded-user" not in seen  # a public request has no identity to pass on


async def test_a_trusted_header_sent_twice_is_refused(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(extra=trusted("[127.0.0.1/32]"))
    headers = [("X-Auth-Request-User", "carol"), ("X-Auth-Request-User", "admin")]
    r = await proxy.get(IDENTITY_ROUTE, headers=headers)
    assert r.status == 401
    assert "X-Auth-Request-User sent 2 times" in (await r.json())["reasons"][0]
    assert upstream.hits == []


async def test_the_api_takes_trusted_headers_but_refuses_them_cross_site(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(extra=trusted("[127.0.0.1/32]"))
    r = await proxy.get("/_jit/api/grants/mine", headers=SSO)
    assert r.status == 200, await r.text()
    body = {"scope": "recording:1/demo-1", "reason": "ticket", "duration": "5m"}
    # The SSO proxy adds its headers to any request the browser makes, so they are
    # ambient credentials, like a cookie: another site's form must not use them.
    r = await proxy.post(
        "/_jit/api/requests", json=body, headers={**SSO, "Origin": "https://evil.example"}
    )
    assert r.status == 403
    assert (await r.json())["error"] == "cross_site"
    r = await proxy.post(
        "/_jit/api/requests", json=body, headers={**SSO, "Sec-Fetch-Site": "same-origin"}
    )
    assert r.status == 201, await r.text()
    assert (await r.json())["user"] == "carol"
    assert upstream.hits == []


# --- an SSO proxy's signed assertion (Pomerium, IAP) -------------------------------------


def assertion(ks: KeyServer, **over: object) -> str:
    claims = {"sub": "erin-id", "email": "erin@example.test", "groups": ["okta-eng"], **over}
    return ks.token(POMERIUM_AUD, **claims)


async def test_a_verified_sso_assertion_from_an_allowed_peer(
    make_proxy: ProxyFactory, upstream: Upstream, pomerium: KeyServer
) -> None:
    proxy: TestClient = await make_proxy(extra=trusted("[127.0.0.1/32]", pomerium.jwks_uri))
    token = assertion(pomerium)
    r = await proxy.get(IDENTITY_ROUTE, headers={"X-Pomerium-Jwt-Assertion": token})
    assert r.status == 200, await r.text()
    seen = received(upstream)
    assert seen["x-forwarded-user"] == "erin-id"
    assert seen["x-forwarded-email"] == "erin@example.test"
    assert seen["x-forwarded-groups"] == "eng"
    assert "x-pomerium-jwt-assertion" not in seen
    hits = len(upstream.hits)

    # With an assertion configured, plain headers are not believed, even from the proxy.
    r = await proxy.get(IDENTITY_ROUTE, headers=SSO)
    assert r.status == 401
    # Forged, or for another audience: refused, with the header named in the reason.
    rogue = KeyServer(issuer=POMERIUM_ISS, keys={"pomerium-1": ROGUE_KEY}).token(POMERIUM_AUD)
    for bad, why in ((rogue, "signature does not verify"),
                     (pomerium.token("other.example.test"), "audience not accepted")):  # fmt: skip
        r = await proxy.get(IDENTITY_ROUTE, headers={"X-Pomerium-Jwt-Assertion": bad})
        assert r.status == 401
        assert f"X-Pomerium-Jwt-Assertion: {why}" in (await r.json())["reasons"][0]
    # The good assertion, now in jitgate's token cache, is still no bearer token.
    r = await proxy.get(IDENTITY_ROUTE, headers={"Authorization": f"Bearer {token}"})
    assert r.status == 401
    assert len(upstream.hits) == hits


async def test_an_sso_assertion_from_another_peer_is_ignored(
    make_proxy: ProxyFactory, upstream: Upstream, pomerium: KeyServer
) -> None:
    proxy = await make_proxy(extra=trusted("[10.0.0.0/8, '::1/128']", pomerium.jwks_uri))
    r = await proxy.get(IDENTITY_ROUTE, headers={"X-Pomerium-Jwt-Assertion": assertion(pomerium)})
    assert r.status == 401
    assert "X-Pomerium-Jwt-Assertion ignored" in (await r.json())["reasons"][0]
    assert upstream.hits == []


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("127.0.0.1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 client seen by a dual-stack listener
        ("10.9.8.7", True),
        ("::1", False),
        ("127.0.0.2", False),
        ("", False),  # a Unix socket
        (None, False),
        ("not-an-address", False),
    ],
)
def test_which_peers_are_trusted(peer: str | None, trusted: bool) -> None:
    sources = (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"))
    settings = IdentitySettings(
        hs_secret=Secret(SECRET), trusted_headers=TrustedHeadersSettings(sources)
    )
    assert Verifier(settings).trusts(peer) is trusted
