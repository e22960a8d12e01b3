"""The shipped Traefik and Envoy forward-auth configs, checked statically.

Neither Traefik nor Envoy runs on the test machine (the nginx config is run for real in
tests/test_authz_nginx.py), so these tests parse the YAML and check that it points at
jitgate's decision endpoint, copies every identity header jitgate answers with, keeps
clients away from the endpoint, and fails closed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, SECRET
from yarl import URL

from proxy.authz import REDIRECT_HEADER, REFUSAL_HEADER
from proxy.settings import load
from proxy.vouch import Vouch

TRAEFIK = ROOT / "deploy" / "traefik" / "jitgate.yml"
ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
# The client headers the proxy in front must clear (docs/upstream.md), written out here.
CLEARED = {
    "remote-user",
    "remote-email",
    "remote-groups",
    "remote-name",
    "x-remote-user",
    "x-remote-email",
    "x-remote-groups",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-forwarded-preferred-username",
    "x-webauth-user",
    "x-webauth-email",
    "x-user",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-prefix",
    "x-http-method-override",
    "true-client-ip",
    "forwarded",
}


@pytest.fixture(scope="module")
def answered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, set[str]]:
    """(the decision path, the identity headers jitgate answers) for the documented config."""
    tmp: Path = tmp_path_factory.mktemp("cfg")
    cfg = tmp / "jitgate.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:8081'}\n"
        f"identity: {{hs_secret: {SECRET}}}\n"
        "forward_auth: {enabled: true, trusted_proxies: [127.0.0.1/32]}\n"
        "forward: {user_headers: true, assertion: true}\n"
    )
    settings = load(cfg, environ={})
    names = Vouch(settings.forward, settings.identity).names
    assert names, "the documented config vouches for someone"
    return f"{settings.prefix}/authz", {n.lower() for n in names}


def test_traefik_forward_auth(answered: tuple[str, set[str]]) -> None:
    path, names = answered
    http = yaml.safe_load(TRAEFIK.read_text())["http"]
    auth = http["middlewares"]["jitgate-authz"]["forwardAuth"]
    address = URL(auth["address"])
    assert address.path == path
    assert address.query.get("browser") == "redirect"  # a browser is sent to sign in
    assert auth["trustForwardHeader"] is False  # Traefik names the request, not the client
    assert "authRequestHeaders" not in auth  # jitgate sees (and refuses) what clients send
    assert {h.lower() for h in auth["authResponseHeaders"]} == names
    # Every route to the replay tool goes through the decision, first.
    routers, services = http["routers"], http["services"]
    replay = routers["replay"]
    assert replay["middlewares"][0] == "jitgate-authz"
    cleared = http["middlewares"]["jitgate-credentials"]["headers"]["customRequestHeaders"]
    assert cleared["Authorization"] == ""
    # The list goes by one regex (Go's RE2; this syntax reads the same in Python's re).
    regex = re.compile(auth["authResponseHeadersRegex"])
    for name in (*CLEARED, "X-Remote-Anything", "X-Auth-Request-Access-Token", "X-Webauth-X"):
        for spelling in (name, name.upper(), name.title(), name.replace("-", "_")):
            assert regex.search(spelling), spelling
    # ...and nothing jitgate answers with, nor what Traefik or the client must send on.
    kept = {"x-forwarded-for", "x-real-ip", "x-forwarded-proto", "x-forwarded-host", "cookie"}
    kept |= {"accept", "x-request-id", "x-remote", "x-users", "remote-address"}
    for name in names | kept:
        assert not regex.search(name), name
    assert replay["middlewares"][1] == "jitgate-credentials"
    for name, router in routers.items():
        if router["service"] == "replay-tool":
            assert "jitgate-authz" in router.get("middlewares", []), name
    # jitgate's pages are served; its decision endpoint is not routed to clients.
    pages = routers["jitgate-pages"]
    assert pages["service"] == "jitgate"
    assert "PathPrefix(`/_jit/`)" in pages["rule"] and "!PathPrefix(`/_jit/authz`)" in pages["rule"]
    jitgate_url = URL(services["jitgate"]["loadBalancer"]["servers"][0]["url"])
    assert address.origin() == jitgate_url.origin()


def _find(node: Any, key: str) -> list[Any]:
    """Every value under `key` anywhere in a parsed YAML tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found += _find(v, key)
    elif isinstance(node, list):
        for item in node:
            found += _find(item, key)
    return found


def _exact(matcher: dict[str, Any]) -> set[str]:
    return {p["exact"] for p in matcher["patterns"]}


def test_envoy_ext_authz(answered: tuple[str, set[str]]) -> None:
    path, names = answered
    doc = yaml.safe_load(ENVOY.read_text())
    (hcm,) = (
        f["typed_config"]
        for f in _find(doc, "filters")[0]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    )
    # One path, made plain by Envoy before anyone reads it; "_" names refused.
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "REJECT_REQUEST"
    )
    filters = hcm["http_filters"]
    assert [f["name"] for f in filters] == [EXT_AUTHZ, "envoy.filters.http.router"]
    authz = filters[0]["typed_config"]
    assert authz["failure_mode_allow"] is False
    service = authz["http_service"]
    assert service["path_prefix"] == path
    assert {"authorization", "cookie", "accept"} <= _exact(authz["allowed_headers"])
    added = {h["key"]: h["value"] for h in service["authorization_request"]["headers_to_add"]}
    assert added == {REDIRECT_HEADER.lower(): "redirect"}
    response = service["authorization_response"]
    assert _exact(response["allowed_upstream_headers"]) == names
    assert REFUSAL_HEADER.lower() in _exact(response["allowed_client_headers"])
    # Routes: the endpoint hidden, jitgate's pages undecided, everything else decided.
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    prefixes = [r["match"]["prefix"] for r in routes]
    assert prefixes == [path, "/_jit/", "/"]
    assert routes[0]["direct_response"]["status"] == 404
    for route in routes[:2]:
        assert route["typed_per_filter_config"][EXT_AUTHZ]["disabled"] is True
    last = routes[2]
    assert last["route"]["cluster"] == "replay_tool" and "typed_per_filter_config" not in last
    assert "authorization" in last["request_headers_to_remove"]
    assert CLEARED - set(last["request_headers_to_remove"]) == set()
    # The client address is the peer's alone, not appended to a client's X-Forwarded-For.
    added = {h["header"]["key"]: h for h in last["request_headers_to_add"]}
    for name in ("x-real-ip", "x-forwarded-for"):
        assert added[name]["header"]["value"] == "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
        assert added[name]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert not names & set(last["request_headers_to_remove"])  # jitgate's would go too
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    assert {service["server_uri"]["cluster"], routes[1]["route"]["cluster"]} == {"jitgate"}
    assert clusters == {"jitgate", "replay_tool"}
