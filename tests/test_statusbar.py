"""The status bar (forward.status_bar): real upstream pages through a real jitgate, and Chromium.

The upstream serves one HTML page in every shape the bar must handle (encodings, CSPs,
sizes) and the other kinds of answer it must leave alone; each is compared byte for byte
with what the upstream sent. The browser test runs jitgate as a process (`jitgate serve`).
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from browserkit import ARTIFACTS, JITGATE, launch, need_browser, serve, upstream
from conftest import ProxyFactory, free_port, make_token, write_config
from waiting import eventually_sync

from proxy import settings as settings_mod
from proxy.errors import ConfigErrors
from proxy.state import STATE
from proxy.statusbar import MAX_PAGE, brotli, extend_csp

REC = "/api/projects/1/session_recordings/demo-1"
ON = "forward: {status_bar: true}"
PAGE = (
    b"<!doctype html><html><head><title>replay</title></head><body><h1>Recording</h1></body></html>"
)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
NONCE = re.compile(rb'<script nonce="([^"]+)">')


def _deflate(data: bytes, wbits: int) -> bytes:
    c = zlib.compressobj(wbits=wbits)
    return c.compress(data) + c.flush()


def _encode(enc: str, data: bytes) -> bytes:
    if enc == "gzip":
        return gzip.compress(data)
    if enc == "deflate":
        return _deflate(data, zlib.MAX_WBITS)
    if enc == "rawdeflate":
        return _deflate(data, -zlib.MAX_WBITS)
    if enc == "br":
        return brotli.compress(data) if brotli is not None else b"\x1b not really brotli"
    return data


async def _page(request: web.Request) -> web.StreamResponse:
    """One HTML page, shaped by the query: ?enc=, csp=, csp_ro=, ct=, size=, chunked=, ..."""
    q = request.query
    body = PAGE
    if "nobody" in q:
        body = body.replace(b"</body></html>", b"")
    if "meta" in q:
        meta = b'<meta http-equiv="Content-Security-Policy" content="default-src \'self\'">'
        body = body.replace(b"<head>", b"<head>" + meta)
    if "size" in q:
        body = body.replace(b"<h1>", b"<p>" + b"x" * int(q["size"]) + b"</p><h1>")
    enc = q.get("enc", "identity")
    data = _encode(enc, body)
    headers = {"Content-Type": q.get("ct", "text/html; charset=utf-8"), "ETag": '"v1"'}
    if enc != "identity":
        headers["Content-Encoding"] = "deflate" if enc == "rawdeflate" else enc
    for key, name in (
        ("csp", "Content-Security-Policy"),
        ("csp_ro", "Content-Security-Policy-Report-Only"),
        ("disp", "Content-Disposition"),
        ("cc", "Cache-Control"),
    ):
        if key in q:
            headers[name] = q[key]
    if "Range" in request.headers:
        headers["Content-Range"] = f"bytes 0-9/{len(data)}"
        return web.Response(status=206, body=data[:10], headers=headers)
    if "chunked" in q:
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 65536):
            await resp.write(data[i : i + 65536])
        await resp.write_eof()
        return resp
    return web.Response(body=data, headers=headers)


async def _json(request: web.Request) -> web.Response:
    return web.json_response({"events": [1, 2, 3], "html": "</body>"})


async def _png(request: web.Request) -> web.Response:
    return web.Response(body=PNG, content_type="image/png")


@pytest.fixture
async def site(aiohttp_server: Any) -> str:
    app = web.Application()
    app.router.add_get(REC + "/snapshots", _json)
    app.router.add_get(REC + "/thumb.png", _png)
    app.router.add_get("/{tail:.*}", _page)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def _proxy(make_proxy: ProxyFactory, site: str, extra: str = ON) -> TestClient:
    client: TestClient = await make_proxy(extra=extra, upstream_url=site)
    await client.app[STATE].grants.add("alice", "recording:1/demo-1", 600, "test", "pytest")
    return client


async def _raw(url: str, method: str = "GET", **headers: str) -> tuple[int, Any, bytes]:
    """Fetch without decompressing: the bytes exactly as they came over the wire."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, url, headers=headers) as r,
    ):
        return r.status, r.headers.copy(), await r.read()


async def _both(
    proxy: TestClient, site: str, target: str, method: str = "GET", **headers: str
) -> tuple[tuple[int, Any, bytes], tuple[int, Any, bytes]]:
    auth = {"Authorization": f"Bearer {make_token('alice')}", **headers}
    via = await _raw(str(proxy.make_url(target)), method, **auth)
    direct = await _raw(site + target, method, **headers)
    return via, direct


@pytest.mark.parametrize("enc", ["identity", "gzip", "deflate", "rawdeflate", "chunked"])
async def test_bar_injected_into_html_under_a_grant(
    make_proxy: ProxyFactory, site: str, enc: str
) -> None:
    proxy = await _proxy(make_proxy, site)
    query = "chunked=1" if enc == "chunked" else f"enc={enc}"
    (status, headers, body), _ = await _both(proxy, site, f"{REC}/player?{query}")
    assert status == 200
    assert "Content-Encoding" not in headers
    assert int(headers["Content-Length"]) == len(body)
    assert "ETag" not in headers and headers["Cache-Control"] == "private, no-store"
    # Before </body>, with the grant's time left (10 minutes) and the link to My access.
    assert body.startswith(PAGE[: PAGE.index(b"</body>")])
    assert body.endswith(b"</script></body></html>")
    assert b'id="jitgate-statusbar" data-left="6' in body  # 600s less the test's own time
    assert b">9 min left<" in body or b">10 min left<" in body
    assert b'<a href="/_jit/access">My access</a>' in body
    assert re.search(rb'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ">', body)


async def test_bar_appended_when_page_has_no_body_end(make_proxy: ProxyFactory, site: str) -> None:
    proxy = await _proxy(make_proxy, site)
    (_, headers, body), (_, _, original) = await _both(proxy, site, f"{REC}/p?nobody=1")
    assert body.startswith(original) and body.endswith(b"</script>")
    assert int(headers["Content-Length"]) == len(body)


@pytest.mark.parametrize(
    ("target", "method", "headers"),
    [
        (f"{REC}/snapshots", "GET", {}),  # JSON (with "</body>" in it)
        (f"{REC}/thumb.png", "GET", {}),
        (f"{REC}/player", "HEAD", {}),
        (f"{REC}/player", "GET", {"Range": "bytes=0-9"}),  # 206
        (f"{REC}/player?disp=attachment%3B%20filename%3Dx.html", "GET", {}),
        (f"{REC}/player?enc=gzip&cc=no-transform", "GET", {}),
        (f"{REC}/player?ct=text/html%3B%20charset%3Dutf-16", "GET", {}),
        (f"{REC}/player?ct=application/xhtml%2Bxml", "GET", {}),
        (f"{REC}/player", "GET", {"Sec-Fetch-Dest": "iframe"}),  # a frame, not the page
        (f"{REC}/player", "GET", {"Sec-Fetch-Dest": "empty"}),  # a script's fetch
        (f"{REC}/player?meta=1", "GET", {}),  # a <meta> CSP cannot be extended
        (
            f"{REC}/player?csp=script-src%20'self'%3B%20require-trusted-types-for%20'script'",
            "GET",
            {},
        ),
        (f"{REC}/player?csp=default-src%20'strict-dynamic'%20'unsafe-inline'", "GET", {}),
        (f"{REC}/player?csp_ro=require-trusted-types-for%20'script'", "GET", {}),
        (f"{REC}/player?size={MAX_PAGE}", "GET", {}),  # over the limit, Content-Length
        (f"{REC}/player?size={MAX_PAGE}&chunked=1", "GET", {}),  # over the limit, streamed
        ("/static/app.html", "GET", {}),  # a public route: no grant
        ("/settings", "GET", {}),  # an identity route: signed in, no grant
    ],
)
async def test_left_byte_for_byte_untouched(
    make_proxy: ProxyFactory, site: str, target: str, method: str, headers: dict[str, str]
) -> None:
    proxy = await _proxy(make_proxy, site)
    (status, got_headers, body), (want_status, want_headers, original) = await _both(
        proxy, site, target, method, **headers
    )
    assert (status, body) == (want_status, original)
    assert b"jitgate-statusbar" not in body
    for name in ("Content-Type", "Content-Encoding", "Content-Length", "ETag", "Content-Range"):
        assert got_headers.get(name) == want_headers.get(name), name


async def test_brotli_only_when_the_module_can_decode_it(
    make_proxy: ProxyFactory, site: str
) -> None:
    proxy = await _proxy(make_proxy, site)
    (_, headers, body), (_, _, original) = await _both(proxy, site, f"{REC}/p?enc=br")
    if brotli is None:
        assert body == original and headers["Content-Encoding"] == "br"
    else:
        assert b"jitgate-statusbar" in body and "Content-Encoding" not in headers


async def test_off_by_default(make_proxy: ProxyFactory, site: str) -> None:
    proxy = await _proxy(make_proxy, site, extra="")
    (_, _, body), (_, _, original) = await _both(proxy, site, f"{REC}/player?enc=gzip")
    assert body == original


async def test_csp_gets_the_nonce_the_bar_uses(make_proxy: ProxyFactory, site: str) -> None:
    proxy = await _proxy(make_proxy, site)
    csp = "default-src%20'self'%3B%20img-src%20*"
    ro = "script-src%20'none'%3B%20report-uri%20/csp"
    (_, headers, body), _ = await _both(proxy, site, f"{REC}/p?csp={csp}&csp_ro={ro}")
    found = NONCE.search(body)
    assert found, body
    nonce = found.group(1).decode()
    assert f'<style nonce="{nonce}">'.encode() in body
    assert headers.getall("Content-Security-Policy") == [
        f"default-src 'self' 'nonce-{nonce}'; img-src *"
    ]
    assert headers.getall("Content-Security-Policy-Report-Only") == [
        f"script-src 'nonce-{nonce}'; report-uri /csp"
    ]
    # A fresh nonce for every page.
    (_, _, again), _ = await _both(proxy, site, f"{REC}/p?csp={csp}")
    other = NONCE.search(again)
    assert other and other.group(1).decode() != nonce


async def test_csp_allowing_inline_is_kept_as_it_is(make_proxy: ProxyFactory, site: str) -> None:
    proxy = await _proxy(make_proxy, site)
    csp = "default-src 'self' 'unsafe-inline'"
    (_, headers, body), _ = await _both(proxy, site, f"{REC}/p?csp={csp.replace(' ', '%20')}")
    # A nonce would switch the page's own 'unsafe-inline' off: the policy stays exactly as is.
    assert headers["Content-Security-Policy"] == csp
    assert b"jitgate-statusbar" in body


N = "'nonce-N'"


@pytest.mark.parametrize(
    ("policy", "extended"),
    [
        ("default-src 'self'", f"default-src 'self' {N}"),
        ("img-src *", "img-src *"),
        ("script-src 'none'; style-src 'self'", f"script-src {N}; style-src 'self' {N}"),
        (
            "script-src-elem 'self'; script-src 'unsafe-inline'",
            f"script-src-elem 'self' {N}; script-src 'unsafe-inline'",
        ),
        ("script-src 'self' 'strict-dynamic'", f"script-src 'self' 'strict-dynamic' {N}"),
        ("script-src 'nonce-a' 'unsafe-inline'", f"script-src 'nonce-a' 'unsafe-inline' {N}"),
        ("default-src 'self' 'unsafe-inline'", "default-src 'self' 'unsafe-inline'"),
        ("script-src 'a'; script-src 'b'", f"script-src 'a' {N}; script-src 'b'"),
        ("DEFAULT-SRC 'SELF'", f"DEFAULT-SRC 'SELF' {N}"),
        ("default-src 'none', img-src 'self'", f"default-src {N}, img-src 'self'"),
        ("default-src 'strict-dynamic' 'unsafe-inline'", None),
        ("default-src 'self'; require-trusted-types-for 'script'", None),
        ("default-src 'self' https://caf\u00e9.example", None),
    ],
)
def test_extend_csp(policy: str, extended: str | None) -> None:
    assert extend_csp(policy, "N") == extended


def test_config_option_is_a_boolean(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None, extra=ON)
    assert settings_mod.load(cfg, environ={}).forward.status_bar is True
    cfg = write_config(
        tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None, extra="forward: {}"
    )
    assert settings_mod.load(cfg, environ={}).forward.status_bar is False
    cfg = write_config(
        tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None,
        extra="forward: {status_bar: sometimes}",
    )  # fmt: skip
    with pytest.raises(ConfigErrors, match=r"forward\.status_bar"):
        settings_mod.load(cfg, environ={})


# --- In Chromium --------------------------------------------------------------------------

# The page's own policy: nothing inline, scripts and styles from itself only.
STRICT_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; base-uri 'none'"
EVENTS = {"events": [{"t": 1, "type": "click"}], "note": "</body><script>x</script>"}


class _Replay(BaseHTTPRequestHandler):
    """A replay tool's page with a strict CSP and its own script, plus a JSON endpoint."""

    def do_GET(self) -> None:
        if self.path.endswith("/snapshots"):
            self._send(json.dumps(EVENTS).encode(), "application/json")
        elif self.path.endswith("/app.js"):
            self._send(b"document.body.dataset.app = 'ran';", "text/javascript")
        else:
            page = (
                "<!doctype html><html><head><title>replay</title>"
                f'<script src="{REC}/app.js" defer></script></head>'
                "<body><h1>Recording demo-1</h1></body></html>"
            )
            self._send(gzip.compress(page.encode()), "text/html; charset=utf-8", gz=True)

    def _send(self, data: bytes, ctype: str, *, gz: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Security-Policy", STRICT_CSP)
        if gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def served(redis_url: str, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """jitgate as a process with the status bar on, in front of the replay page."""
    with upstream(_Replay) as upstream_url:
        cfg = write_config(tmp_path, upstream_url=upstream_url, redis_url=redis_url, extra=ON)
        with serve(cfg, free_port()) as base:
            yield cfg, base


def _poll(read: Callable[[], str], pattern: str, timeout: float = 15.0) -> str:
    """Wait for read() to match; polled from here, as the page's CSP forbids eval."""
    texts: list[str] = []

    def matched() -> str | None:
        texts.append(read())
        return texts[-1] if re.fullmatch(pattern, texts[-1]) else None

    try:
        return eventually_sync(matched, within=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{texts[-1]!r} never matched {pattern!r}") from None


def test_chromium_shows_the_bar_under_the_pages_csp(served: tuple[Path, str]) -> None:
    sync_playwright = need_browser()
    cfg, base = served
    out = subprocess.run(
        [JITGATE, "grants", "add", "--config", str(cfg), "--user", "alice",
         "--scope", "recording:1/demo-1", "--ttl", "15m", "--reason", "status bar test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 600})
            context.add_cookies(
                [{"name": "jitgate_token", "value": make_token("alice"), "url": base}]
            )
            # Registered by the browser itself, so the page's CSP does not apply to it.
            context.add_init_script(
                "window.__violations = [];"
                "document.addEventListener('securitypolicyviolation', e =>"
                " window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(f"{base}{REC}/player")
            bar = page.locator("#jitgate-statusbar .jitgate-sb-bar")
            bar.wait_for(state="visible")
            # The script ran (the countdown replaced the server's "N min left") and the
            # style applied (fixed in the corner): the page's CSP allowed both.
            left = page.locator(".jitgate-sb-left")
            first = _poll(lambda: left.inner_text(), r"\d+:\d\d left")
            assert re.fullmatch(r"1[45]:\d\d left", first), first
            position = bar.evaluate("e => getComputedStyle(e.parentElement).position")
            assert position == "fixed"
            box = bar.bounding_box()
            assert box is not None and box["y"] > 500 and box["height"] < 40
            assert page.inner_text("h1") == "Recording demo-1"
            assert page.get_attribute("body", "data-app") == "ran"  # the page's own script
            assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d UTC", bar.inner_text())
            assert page.get_attribute("#jitgate-statusbar a", "href") == "/_jit/access"
            page.screenshot(path=str(ARTIFACTS / "statusbar.png"))
            page.wait_for_timeout(1200)
            assert left.inner_text() != first  # counting down
            assert page.evaluate("window.__violations") == []
            assert errors == []

            page.click("#jitgate-statusbar .jitgate-sb-close")
            assert bar.is_hidden()  # dismissed

            # JSON under the same grant arrives exactly as the upstream wrote it.
            resp = page.goto(f"{base}{REC}/snapshots")
            assert resp is not None and resp.status == 200
            assert resp.body() == json.dumps(EVENTS).encode()
            assert page.locator("#jitgate-statusbar").count() == 0
        finally:
            browser.close()
