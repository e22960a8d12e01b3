"""jitgate's own pages: token sign-in, sign-out and the return-URL check."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from conftest import Upstream, make_token

from proxy.web.views import safe_next


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/dashboard?t=5", "/dashboard?t=5"),
        ("/", "/"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("/%2Fevil.example", "/"),
        ("/%5cevil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
        ("\\\\evil", "/"),
        ("/%2F%2Fevil.example", "/"),
        ("/%5Cevil.example", "/"),
        ("/\t/evil.example", "/"),
        ("/\n/evil.example", "/"),
        ("/..//evil.example", "/evil.example"),
        ("/a/../..//evil.example", "/evil.example"),
        ("/./replay", "/replay"),
        ("/%09/evil.example", "/"),
        ("/ /evil.example", "/"),
        ("/\u00e9", "/"),
        ("HTTPS://evil.example", "/"),
    ],
)
def test_safe_next(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


async def test_sign_in_sets_cookie_and_returns(proxy: TestClient, upstream: Upstream) -> None:
    form = await proxy.get("/_jit/login", params={"next": "/dashboard"})
    assert form.status == 200
    assert 'name="next" value="/dashboard"' in await form.text()
    r = await proxy.post(
        "/_jit/login",
        data={"token": make_token("alice"), "next": "/dashboard"},
        allow_redirects=False,
    )
    assert r.status == 303
    assert r.headers["Location"] == "/dashboard"
    cookie = r.cookies["jitgate_token"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    r = await proxy.get("/dashboard", cookies={"jitgate_token": cookie.value})
    assert r.status == 200
    # The identity cookie itself is not passed upstream.
    assert "jitgate_token" not in upstream.hits[-1][2].get("Cookie", "")


async def test_sign_in_with_bad_token_is_refused(proxy: TestClient) -> None:
    r = await proxy.post("/_jit/login", data={"token": "nope", "next": "//evil"})
    assert r.status == 401
    text = await r.text()
    assert "malformed token" in text and 'value="/"' in text
    assert "jitgate_token" not in r.cookies


async def test_cross_site_sign_in_is_refused(proxy: TestClient) -> None:
    r = await proxy.post(
        "/_jit/login",
        data={"token": make_token("mallory")},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert r.status == 403
    assert "jitgate_token" not in r.cookies


async def test_sign_out_asks_then_clears_cookie_on_a_same_origin_post(proxy: TestClient) -> None:
    # A GET only asks: another site can make a browser GET anything.
    r = await proxy.get("/_jit/logout", allow_redirects=False)
    assert r.status == 200
    assert 'method="post" action="/_jit/logout"' in await r.text()
    assert "jitgate_token" not in r.cookies
    origin = str(proxy.make_url("/").origin())
    r = await proxy.post("/_jit/logout", headers={"Origin": origin}, allow_redirects=False)
    assert r.status == 303
    assert r.cookies["jitgate_token"].value == ""


async def test_cross_site_sign_out_is_refused(proxy: TestClient) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}):
        r = await proxy.post("/_jit/logout", headers=headers, allow_redirects=False)
        assert r.status == 403, headers
        assert "jitgate_token" not in r.cookies


async def test_401_page_links_to_sign_in_with_return_path(proxy: TestClient) -> None:
    r = await proxy.get("/dashboard?t=3", headers={"Accept": "text/html"})
    assert r.status == 401
    assert "/_jit/login?next=/dashboard?t%3D3" in await r.text()
