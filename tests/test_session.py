"""identity/session.py against a real aiohttp server: lifetimes, key rotation, tampering, Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from proxy.identity import Identity
from proxy.identity.session import Sessions
from proxy.settings.identity import SessionSettings
from proxy.settings.read import Secret

K1, K2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def serve(aiohttp_client: Any, sessions: Sessions) -> TestClient:
    """A tiny app: /start signs alice in, /who says who the session is, /end signs out."""

    async def start(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        await sessions.start(request, response, Identity("alice", ("eng",), "a@x"), "id.tok.en")
        return response

    async def who(request: web.Request) -> web.Response:
        found = await sessions.read(request)
        return web.json_response(None if found is None else found.identity.subject)

    async def end(request: web.Request) -> web.Response:
        response = web.Response(text="bye")
        await sessions.end(request, response)
        return response

    app = web.Application()
    app.router.add_get("/start", start)
    app.router.add_get("/who", who)
    app.router.add_get("/end", end)
    app.on_response_prepare.append(sessions.on_prepare)
    client: TestClient = await aiohttp_client(app)
    return client


def settings(*keys: str, **kw: Any) -> SessionSettings:
    return SessionSettings(keys=tuple(Secret(k) for k in keys), secure=False, **kw)


async def who(client: TestClient, cookie: str | None) -> tuple[Any, str | None]:
    cookies = {"jitgate_session": cookie} if cookie is not None else {}
    r = await client.get("/who", cookies=cookies)
    new = r.cookies.get("jitgate_session")
    return await r.json(), (new.value if new is not None else None)


async def sign_in(client: TestClient) -> str:
    r = await client.get("/start")
    return r.cookies["jitgate_session"].value


async def test_cookie_attributes(aiohttp_client: Any) -> None:
    s = Sessions(SessionSettings(keys=(Secret(K1),), max_age=600))
    client = await serve(aiohttp_client, s)
    r = await client.get("/start")
    header = r.headers["Set-Cookie"]
    parts = [p.strip().lower() for p in header.split(";")]
    assert "secure" in parts and "httponly" in parts and "samesite=lax" in parts
    assert "path=/" in parts and "max-age=600" in parts


async def test_idle_timeout_and_touch(aiohttp_client: Any) -> None:
    clock = Clock()
    client = await serve(
        aiohttp_client, Sessions(settings(K1, max_age=3600, idle_timeout=100), clock=clock)
    )
    cookie = await sign_in(client)
    clock.now += 5  # within the touch interval (10 s): nothing is rewritten
    assert await who(client, cookie) == ("alice", None)
    clock.now += 90  # 95 s idle: still alive, and `seen` moves on in a new cookie
    subject, touched = await who(client, cookie)
    assert subject == "alice" and touched
    clock.now += 90  # 185 s after sign-in, 90 s after the touch
    assert (await who(client, touched))[0] == "alice"
    # The old cookie (seen at sign-in) is past the idle timeout: enforced from inside it.
    assert await who(client, cookie) == (None, "")
    clock.now += 101
    assert (await who(client, touched))[0] is None


async def test_absolute_lifetime_holds_however_busy(aiohttp_client: Any) -> None:
    clock = Clock()
    client = await serve(
        aiohttp_client, Sessions(settings(K1, max_age=300, idle_timeout=100), clock=clock)
    )
    cookie = await sign_in(client)
    for _ in range(5):
        clock.now += 59
        subject, new = await who(client, cookie)
        assert subject == "alice"
        cookie = new or cookie
    clock.now += 10  # 305 s after sign-in
    assert await who(client, cookie) == (None, "")


async def test_key_rotation(aiohttp_client: Any) -> None:
    clock = Clock()
    old = await serve(aiohttp_client, Sessions(settings(K1), clock=clock))
    cookie = await sign_in(old)
    # K2 first: it encrypts, K1 still decrypts, so nobody is signed out by the rotation.
    rotated = await serve(aiohttp_client, Sessions(settings(K2, K1), clock=clock))
    assert (await who(rotated, cookie))[0] == "alice"
    clock.now += 400  # past the touch interval: the session is rewritten, now under K2
    subject, renewed = await who(rotated, cookie)
    assert subject == "alice" and renewed
    assert json.loads(Fernet(K2.encode()).decrypt(renewed.encode()))["session"]["sub"] == "alice"
    fresh = await sign_in(rotated)
    Fernet(K2.encode()).decrypt(fresh.encode())  # new sessions are K2's
    # K1 removed: its sessions are gone (and their cookies cleared), K2's live on.
    only_new = await serve(aiohttp_client, Sessions(settings(K2), clock=clock))
    assert await who(only_new, cookie) == (None, "")
    assert (await who(only_new, renewed))[0] == "alice"


@pytest.mark.parametrize(
    "bad",
    ["", "x", "gAAAAA", "%%%", "A" * 5000, "gAAAAABk" + "A" * 120 + "==", "\u00e9t\u00e9"],
)
async def test_garbage_cookies_are_no_session(aiohttp_client: Any, bad: str) -> None:
    client = await serve(aiohttp_client, Sessions(settings(K1)))
    r = await client.get("/who", headers={"Cookie": f"jitgate_session={bad}"})
    assert r.status == 200 and await r.json() is None


async def test_tampered_cookie_is_no_session(aiohttp_client: Any) -> None:
    client = await serve(aiohttp_client, Sessions(settings(K1)))
    cookie = await sign_in(client)
    for i in (10, 40, len(cookie) - 10):
        flipped = cookie[:i] + ("B" if cookie[i] != "B" else "C") + cookie[i + 1 :]
        assert await who(client, flipped) == (None, "")
    # Another deployment's key: a valid Fernet token, but not ours.
    foreign = Fernet(K2.encode()).encrypt(b'{"created": 1, "session": {"v": 1, "sub": "root"}}')
    assert await who(client, foreign.decode()) == (None, "")
    assert (await who(client, cookie))[0] == "alice"


async def test_redis_store(aiohttp_client: Any, redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        client = await serve(
            aiohttp_client, Sessions(settings(K1, store="redis"), redis=redis, key_prefix="t:")
        )
        cookie = await sign_in(client)
        assert len(cookie) == 43
        keys = await redis.keys("t:session:*")
        assert len(keys) == 1 and cookie not in keys[0].decode()
        assert 0 < await redis.ttl(keys[0]) <= 8 * 3600
        assert (await who(client, cookie))[0] == "alice"
        # Signing in again never reuses the old id (no session fixation).
        r = await client.get("/start", cookies={"jitgate_session": cookie})
        again = r.cookies["jitgate_session"].value
        assert again != cookie and len(await redis.keys("t:session:*")) == 1
        assert (await who(client, cookie))[0] is None
        r = await client.get("/end", cookies={"jitgate_session": again})
        assert r.cookies["jitgate_session"].value == ""
        assert await redis.keys("t:session:*") == []
        assert (await who(client, again))[0] is None
    finally:
        await redis.aclose()
