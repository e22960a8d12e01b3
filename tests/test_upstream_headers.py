"""What the upstream receives (docs/upstream.md), checked at real upstreams.

- A client's identity and routing headers (every name of the maintained list, in mixed
  case and with `_`) never reach the upstream that echoes what it gets.
- X-Real-IP, X-Forwarded-For and Forwarded come from the TCP peer, or extend the chain a
  trusted proxy sent.
- `forward.preserve_host` sends the client's Host, checked against `forward.allowed_hosts`:
  what a real Django app's CSRF middleware needs to accept a browser's form through jitgate.

The test client connects from 127.0.0.1: `trusted_proxies: [127.0.0.1/32]` makes it a
trusted proxy, `[10.0.0.0/8]` an ordinary client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, SECRET, ProxyFactory, Upstream, bearer, free_port, write_config
from waiting import eventually

from proxy.app import build_app
from proxy.errors import ConfigErrors
from proxy.settings import load

IDENTITY_ROUTE = "/dashboard"  # no route matches: the policy's default, identity only
PUBLIC_ROUTE = "/healthz"

# Every name the upstream must never receive from a client, as an issue reporter or a
# security team would list them (written out here, not read from the code).
NAMES = [
    "Remote-User",
    "Remote-Email",
    "Remote-Groups",
    "Remote-Name",
    "X-Remote-User",  # X-Remote-*
    "X-Remote-Email",
    "X-Remote-Groups",
    "X-Remote-Anything",
    "X-Auth-Request-User",  # X-Auth-Request-*
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Access-Token",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Webauth-User",  # X-Webauth-*
    "X-Webauth-Email",
    "X-Webauth-Name",
    "X-User",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Forwarded-Prefix",
    "X-HTTP-Method-Override",
    "X-Corp-Tenant",  # configured: forward.drop_headers [X-Corp-*, X-Team]
    "X-Team",
]
EXTRA = "drop_headers: [X-Corp-*, X-Team]"


def spellings(name: str) -> list[str]:
    """The name, in mixed case, in upper case, and each of those with '_' for '-'."""
    mixed = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))
    dashed = [name, mixed, name.upper()]
    return dashed + [n.replace("-", "_") for n in dashed]


def forged(upstream: Upstream) -> list[str]:
    """The headers of the upstream's last request that carry a client's forged value."""
    return [f"{k}: {v}" for k, v in upstream.hits[-1][2].items() if "forged" in v]


async def raw_get(proxy: TestClient, path: str, headers: list[tuple[str, str]]) -> int:
    """GET with exactly these header lines (a client library would merge the spellings)."""
    assert proxy.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    lines = [f"GET {path} HTTP/1.1", "Host: replay.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    status = (await reader.read()).split(b"\r\n", 1)[0]
    writer.close()
    return int(status.split()[1])


def received(upstream: Upstream) -> dict[str, str]:
    return {k.lower(): v for k, v in upstream.hits[-1][2].items()}


async def test_with_underscores_allowed_every_spelling_is_dropped(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(
        extra=f"forward: {{reject_underscore_headers: false, user_headers: true, {EXTRA}}}"
    )
    leaked = {}
    for name in NAMES:
        sent = [(s, f"forged-{i}") for i, s in enumerate(spellings(name))]
        for path in (IDENTITY_ROUTE, PUBLIC_ROUTE):
            assert await raw_get(proxy, path, [*bearer("alice").items(), *sent]) == 200
            if found := forged(upstream):
                leaked[(name, path)] = found
    assert leaked == {}
    # What jitgate sets itself is set after the drop: the vouched user, nothing forged.
    await proxy.get(IDENTITY_ROUTE, headers={**bearer("alice"), "X_Forwarded_User": "forged"})
    assert received(upstream)["x-forwarded-user"] == "alice"
    assert not any("_" in k for k in upstream.hits[-1][2])


async def test_by_default_underscores_are_refused_and_dashes_dropped(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(extra=f"forward: {{{EXTRA}}}")
    leaked = {}
    for name in NAMES:
        dashed, underscored = spellings(name)[:3], spellings(name)[3:]
        sent = [*bearer("alice").items(), *((s, "forged") for s in dashed)]
        assert await raw_get(proxy, IDENTITY_ROUTE, sent) == 200
        if found := forged(upstream):
            leaked[name] = found
        hits = len(upstream.hits)
        for spelling in underscored:
            assert await raw_get(proxy, PUBLIC_ROUTE, [(spelling, "forged")]) == 400, spelling
        assert len(upstream.hits) == hits
    assert leaked == {}


async def test_other_headers_pass(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    """The list is no blanket: near names and the request's own headers go through."""
    proxy = await make_proxy(extra=f"forward: {{{EXTRA}}}")
    kept = {
        "X-Request-Id": "r1",
        "X-Remote": "kept",  # not X-Remote-*
        "X-Users": "kept",
        "X-Corporate": "kept",  # not X-Corp-*
        "Accept-Language": "fr",
        "Origin": "http://replay.test",
    }
    r = await proxy.get(PUBLIC_ROUTE, headers=kept)
    assert r.status == 200
    seen = received(upstream)
    assert {k: seen.get(k.lower()) for k in kept} == kept


async def test_a_websocket_upgrade_gets_the_same_hygiene(
    make_proxy: ProxyFactory, aiohttp_server: Any
) -> None:
    seen: list[dict[str, str]] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        await resp.close()
        return resp

    app = web.Application()
    app.router.add_get("/live", ws)
    server = await aiohttp_server(app)
    proxy = await make_proxy(
        upstream_url=str(server.make_url("")).rstrip("/"),
        extra="forward: {reject_underscore_headers: false}",
    )
    sent = {
        **bearer("alice"),
        "X-Remote-User": "forged",
        "X_Original_URL": "/forged",
        "X-Real-IP": "forged",
        "X-Forwarded-For": "forged",
    }
    async with proxy.ws_connect("/live", headers=sent) as conn:
        await conn.receive()
    (headers,) = seen
    assert [f"{k}: {v}" for k, v in headers.items() if "forged" in v] == []
    assert headers["x-real-ip"] == headers["x-forwarded-for"] == "127.0.0.1"


# --- X-Real-IP, X-Forwarded-For, Forwarded -----------------------------------------------

CLIENT_FORGERIES = {
    "X-Real-IP": "6.6.6.6",
    "X-Forwarded-For": "6.6.6.6",
    "Forwarded": "for=6.6.6.6;proto=https",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "evil.example",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
}


async def test_an_untrusted_peer_gets_its_own_address(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(extra="forward: {trusted_proxies: [10.0.0.0/8]}")
    r = await proxy.get(PUBLIC_ROUTE, headers={**CLIENT_FORGERIES, "Host": "replay.test"})
    assert r.status == 200
    seen = received(upstream)
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["forwarded"] == "for=127.0.0.1;proto=http;host=replay.test"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "replay.test"
    assert not any("6.6.6.6" in v or "evil" in v for v in seen.values()), seen


async def test_a_trusted_proxy_chain_is_extended(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    proxy = await make_proxy(extra="forward: {trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]}")
    # The load balancer's chain: a client's forged entry, the client, an inner proxy.
    chain = [
        ("X-Forwarded-For", "6.6.6.6, 203.0.113.7"),
        ("x-forwarded-for", "10.0.0.2"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "replay.example.com"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Remote-User", "forged"),
    ]
    assert await raw_get(proxy, PUBLIC_ROUTE, chain) == 200
    seen = received(upstream)
    assert seen["x-forwarded-for"] == "6.6.6.6, 203.0.113.7, 10.0.0.2, 127.0.0.1"
    # The right-most address that is not a trusted proxy is the client.
    assert seen["x-real-ip"] == "203.0.113.7"
    assert seen["forwarded"] == (
        "for=6.6.6.6, for=203.0.113.7, for=10.0.0.2, "
        "for=127.0.0.1;proto=https;host=replay.example.com"
    )
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "replay.example.com"
    assert "x-remote-user" not in seen  # the list applies to trusted proxies too

    # A Forwarded header of the proxy's own is kept and extended; a bogus proto is not used.
    r = await proxy.get(
        PUBLIC_ROUTE,
        headers={
            "Forwarded": 'for="[2001:db8::1]";proto=https',
            "X-Forwarded-For": "2001:db8::1",
            "X-Forwarded-Proto": "gopher",
            "Host": "replay.test",
        },
    )
    assert r.status == 200
    seen = received(upstream)
    assert seen["forwarded"] == (
        'for="[2001:db8::1]";proto=https, for=127.0.0.1;proto=http;host=replay.test'
    )
    assert seen["x-real-ip"] == "2001:db8::1"
    assert seen["x-forwarded-proto"] == "http"

    # The audit record names the same client as X-Real-IP.
    def access_ips() -> list[str]:
        path = tmp_path / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r["client_ip"] for r in map(json.loads, lines) if r["event"] == "access.allow"]

    assert await eventually(lambda: len(access_ips()) >= 2 and access_ips(), what="records") == [
        "203.0.113.7",
        "2001:db8::1",
    ]

    # Nothing but trusted hops, or no chain at all: the peer is the client.
    await proxy.get(PUBLIC_ROUTE, headers={"X-Forwarded-For": "10.1.1.1"})
    assert received(upstream)["x-real-ip"] == "10.1.1.1"
    await proxy.get(PUBLIC_ROUTE)
    seen = received(upstream)
    assert (seen["x-real-ip"], seen["x-forwarded-for"]) == ("127.0.0.1", "127.0.0.1")


# --- Host ---------------------------------------------------------------------------------


async def test_host_sent_upstream_and_checked(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    authority = upstream.url.split("//", 1)[1]
    proxy = await make_proxy()
    await proxy.get(PUBLIC_ROUTE, headers={"Host": "replay.test"})
    assert received(upstream)["host"] == authority

    extra = "forward: {preserve_host: true, allowed_hosts: [replay.test, replay.example.com]}"
    proxy = await make_proxy(extra=extra)
    for host in ("replay.test", "Replay.Example.com:8443"):
        r = await proxy.get(PUBLIC_ROUTE, headers={"Host": host})
        assert r.status == 200
        assert received(upstream)["host"] == host
    hits = len(upstream.hits)
    for host in ("evil.example", "replay.test.evil.example", "127.0.0.1"):
        r = await proxy.get(PUBLIC_ROUTE, headers={"Host": host})
        assert r.status == 400, host
        assert "forward.allowed_hosts" in await r.text()
    assert len(upstream.hits) == hits


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        ("{preserve_host: true}", "forward.allowed_hosts: is required with preserve_host"),
        ("{allowed_hosts: ['replay.test:443']}", "is not a host name"),
        ("{allowed_hosts: ['*.example.com']}", "is not a host name"),
        ("{drop_headers: ['*']}", "is not a header name"),
        ("{drop_headers: ['X*']}", "too short a prefix"),
        ("{drop_headers: ['X Bad']}", "is not a header name"),
        ("{trusted_proxies: [0.0.0.0/0]}", "would trust every client"),
        ("{trusted_proxies: [10.0.0.1/8]}", "is not a CIDR"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, forward: str, message: str) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        f"upstream: {{url: 'http://127.0.0.1:8081'}}\nidentity: {{hs_secret: {SECRET}}}\n"
        f"forward: {forward}\n"
    )
    with pytest.raises(ConfigErrors) as err:
        load(cfg, environ={})
    assert message in str(err.value)


def test_preserve_host_and_host_header_exclude_each_other(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        "upstream: {url: 'http://127.0.0.1:8081', host_header: replay.internal}\n"
        f"identity: {{hs_secret: {SECRET}}}\n"
        "forward: {preserve_host: true, allowed_hosts: [replay.test]}\n"
    )
    with pytest.raises(ConfigErrors) as err:
        load(cfg, environ={})
    assert "upstream.host_header both name the Host" in str(err.value)


# --- a real Django app and its CSRF middleware --------------------------------------------


@pytest.fixture(scope="module")
def django_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tests/django_app.py served by Django's own server on a free port; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("django") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "django_app.py"), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"the Django app did not start:\n{log.read_text()}") from None
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


async def post_form(proxy: TestClient, origin: str = "http://replay.test") -> tuple[int, str]:
    """A browser's form POST through jitgate: token from the form page, cookie, Origin."""
    url = proxy.make_url("")
    host = {"Host": "replay.test", **bearer("alice")}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url.with_path("/form"), headers=host) as r:
            assert r.status == 200, await r.text()
            token = await r.text()
            cookie = r.cookies["csrftoken"].value
        async with http.post(
            url.with_path("/submit"),
            data={"csrfmiddlewaretoken": token},
            headers={**host, "Cookie": f"csrftoken={cookie}", "Origin": origin},
        ) as r:
            return r.status, await r.text()


async def test_django_csrf_needs_the_public_host(make_proxy: ProxyFactory, django_app: str) -> None:
    # Without preserve_host, Django sees its own address as Host: the browser's Origin
    # (jitgate's public name) does not match, and its CSRF check refuses the form.
    proxy = await make_proxy(upstream_url=django_app)
    status, body = await post_form(proxy)
    assert status == 403 and "CSRF" in body
    assert (await proxy.get("/host", headers={"Host": "replay.test", **bearer()})).status == 200

    extra = "forward: {preserve_host: true, allowed_hosts: [replay.test]}"
    proxy = await make_proxy(upstream_url=django_app, extra=extra)
    r = await proxy.get("/host", headers={"Host": "replay.test", **bearer()})
    assert await r.text() == "replay.test"
    assert await post_form(proxy) == (200, "accepted")
    # The upstream's CSRF check still works: another site's Origin is refused.
    status, body = await post_form(proxy, origin="http://evil.example")
    assert status == 403 and "CSRF" in body


async def test_django_csrf_with_the_right_host_header(
    aiohttp_client: Any, tmp_path: Path, redis_url: str, django_app: str
) -> None:
    """upstream.host_header set to the one public name works too."""
    cfg = write_config(tmp_path, upstream_url=django_app, redis_url=redis_url)
    text = cfg.read_text().replace(
        f'url: "{django_app}"', f'url: "{django_app}", host_header: replay.test'
    )
    assert "host_header" in text
    cfg.write_text(text)
    proxy: TestClient = await aiohttp_client(build_app(load(cfg, environ={})))
    assert await post_form(proxy) == (200, "accepted")
