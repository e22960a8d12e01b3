"""Browser sessions started by an OIDC sign-in: storage, encryption and lifetimes.

The session lives in an aiohttp-session storage: the whole session in a Fernet-encrypted
cookie (EncryptedCookieStorage), or in Redis under a random id that is all the cookie
holds. Several keys may be configured: the first encrypts, every one decrypts
(MultiFernet), so a new key can be put first without signing anyone out, and the old one
removed once the sessions it encrypted have ended.

Lifetimes are enforced here from timestamps inside the encrypted session (`created` at
sign-in, `seen` at the last request), never from the cookie's own expiry, which the
browser controls. A session that cannot be decrypted or read is no session: the browser
is asked to sign in again.

aiohttp-session's middleware is not used: it cannot write a cookie into a response the
forwarder has already started streaming. A session whose `seen` moved on is written in
the response's prepare hook instead (`on_prepare`), which every response passes through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp_session import AbstractStorage, Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..settings.identity import SessionSettings
from .verifier import Identity, SessionLookup

log = logging.getLogger("jitgate.session")

_VERSION = 1
_SID = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class UserSession:
    identity: Identity
    id_token: str | None  # kept for the provider's logout (id_token_hint)
    created: float  # sign-in time (unix seconds)
    seen: float  # the last request that moved it on


# What this request's session cookie gave (read once per request), and a Session to
# write into the response when it goes out.
@dataclass(frozen=True)
class _Read:
    found: UserSession | None


_READ = web.RequestKey("jitgate_session_read", _Read)
_DIRTY = web.RequestKey("jitgate_session_dirty", Session)


def fernet_of(settings: SessionSettings) -> MultiFernet:
    """The session keys as one MultiFernet: the first encrypts, every one decrypts."""
    return MultiFernet([Fernet(k.reveal().encode()) for k in settings.keys])


class _RotatingCookieStorage(EncryptedCookieStorage):
    """EncryptedCookieStorage with several keys (its constructor takes only one)."""

    def __init__(self, fernet: MultiFernet, **params: Any) -> None:
        super().__init__(Fernet(Fernet.generate_key()), **params)
        self._fernet = fernet  # type: ignore[assignment]  # same encrypt/decrypt API


class RedisSessionStorage(AbstractStorage):
    """Sessions in Redis under a random id; the cookie holds only that id.

    The key is a hash of the id, so a copy of Redis does not hold usable cookies, and the
    value is encrypted with the session keys, so it does not hold ID tokens either.
    """

    def __init__(self, redis: Redis, fernet: MultiFernet, key_prefix: str, **params: Any) -> None:
        super().__init__(**params)
        self._redis = redis
        self._fernet = fernet
        self._prefix = f"{key_prefix}session:"

    def _key(self, sid: str) -> str:
        return self._prefix + hashlib.sha256(sid.encode()).hexdigest()

    async def load_session(self, request: web.Request) -> Session:
        sid = self.load_cookie(request)
        if sid is None or not _SID.fullmatch(sid):
            return Session(None, data=None, new=True, max_age=self.max_age)
        raw = await self._redis.get(self._key(sid))
        if raw is None:
            return Session(None, data=None, new=True, max_age=self.max_age)
        try:
            data = json.loads(self._fernet.decrypt(raw))
        except (InvalidToken, ValueError):
            return Session(None, data=None, new=True, max_age=self.max_age)
        return Session(sid, data=data, new=False, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        sid = session.identity
        if session.empty:
            if sid is not None:
                await self._redis.delete(self._key(str(sid)))
            self.save_cookie(response, "", max_age=session.max_age)
            return
        if sid is None:
            sid = secrets.token_urlsafe(32)  # 43 characters, 256 bits
        body = self._fernet.encrypt(self._encoder(self._get_session_data(session)).encode())
        await self._redis.set(self._key(str(sid)), body, ex=max(1, session.max_age or 1))
        self.save_cookie(response, str(sid), max_age=session.max_age)


class Sessions:
    """Read, start, move on and end the browser sessions of one jitgate."""

    def __init__(
        self,
        settings: SessionSettings,
        *,
        redis: Redis | None = None,
        key_prefix: str = "jit:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cookie = settings.cookie
        self.fernet = fernet_of(settings)
        self._clock = clock
        params: dict[str, Any] = {
            "cookie_name": settings.cookie,
            "max_age": int(settings.max_age),
            "path": "/",
            "secure": settings.secure,
            "httponly": True,
            "samesite": "Lax",  # sent on top-level navigations, e.g. back from the IdP
        }
        self.storage: AbstractStorage
        if settings.store == "redis":
            if redis is None:
                raise ValueError("identity.session.store redis needs a Redis")
            self.storage = RedisSessionStorage(redis, self.fernet, key_prefix, **params)
        else:
            self.storage = _RotatingCookieStorage(self.fernet, **params)
        # Writing `seen` back costs a cookie (or a Redis write) per request; once per
        # touch interval is enough, at the price of the idle timeout being that much early.
        self.touch_interval = max(1.0, min(60.0, settings.idle_timeout / 10))

    def lookup(self, request: web.Request) -> SessionLookup:
        """Return a callable giving the request's session identity, read only when asked."""

        async def identity() -> Identity | None:
            found = await self.read(request)
            return found.identity if found is not None else None

        return identity

    async def read(self, request: web.Request) -> UserSession | None:
        """Return the request's live session, or None (no cookie, tampered, expired)."""
        if _READ in request:
            return request[_READ].found
        found = await self._read(request)
        request[_READ] = _Read(found)
        return found

    async def _read(self, request: web.Request) -> UserSession | None:
        if not request.cookies.get(self.cookie):
            return None
        try:
            session = await self.storage.load_session(request)
        except (RedisError, OSError) as exc:
            log.warning("session store unavailable: %r; treating the request as signed out", exc)
            return None
        except Exception as exc:  # a decryptable cookie of an unknown shape: never crash
            log.warning("session unreadable: %s", type(exc).__name__)
            return None
        if session.new or session.empty:
            # A cookie that no key decrypts (tampered, or its key was removed) or whose
            # Redis entry is gone: clear it so the browser stops sending it.
            request[_DIRTY] = _cleared(session)
            return None
        found = _parse(dict(session))
        now = self._clock()
        if found is None or now - found.created > self.settings.max_age:
            why = "unreadable" if found is None else "past identity.session.max_age"
        elif now - found.seen > self.settings.idle_timeout:
            why = "idle past identity.session.idle_timeout"
        else:
            if now - found.seen >= self.touch_interval:
                session["seen"] = now
                session.max_age = self._remaining(found.created, now)
                request[_DIRTY] = session
            return found
        log.info("session of %s ended: %s", found.identity.subject if found else "?", why)
        session.invalidate()
        request[_DIRTY] = session
        return None

    async def start(
        self,
        request: web.Request,
        response: web.StreamResponse,
        identity: Identity,
        id_token: str | None,
    ) -> None:
        """Write a new session (a new id, never the old one) for identity into response."""
        now = self._clock()
        session = Session(None, data=None, new=True, max_age=int(self.settings.max_age))
        session.update(
            {
                "v": _VERSION,
                "sub": identity.subject,
                "email": identity.email,
                "groups": list(identity.groups),
                "idt": id_token,
                "created": now,
                "seen": now,
            }
        )
        old = await self._existing(request)
        if old is not None and not old.new:
            old.invalidate()  # a stored session is dropped, not reused: no fixation
            await self.storage.save_session(request, web.Response(), old)
        await self.storage.save_session(request, response, session)
        request.pop(_DIRTY, None)

    async def end(self, request: web.Request, response: web.StreamResponse) -> UserSession | None:
        """Clear the request's session in response (and in Redis); return what it was."""
        found = await self.read(request)
        session = await self._existing(request)
        if session is None:
            session = Session(None, data=None, new=True, max_age=None)
        session.invalidate()
        await self.storage.save_session(request, response, session)
        request.pop(_DIRTY, None)
        return found

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Write a session this request moved on or ended into its response's headers."""
        session = request.pop(_DIRTY, None)
        if session is None:
            return
        # The prepare hook runs after the response's cookies became headers, so the
        # cookie is made on a scratch response and its Set-Cookie header copied over.
        scratch = web.Response()
        try:
            await self.storage.save_session(request, scratch, session)
        except (RedisError, OSError) as exc:
            log.warning("session not saved: %r", exc)
            return
        for morsel in scratch.cookies.values():
            response.headers.add("Set-Cookie", morsel.OutputString())

    async def _existing(self, request: web.Request) -> Session | None:
        if not request.cookies.get(self.cookie):
            return None
        try:
            session: Session = await self.storage.load_session(request)
        except Exception:  # unreadable: there is nothing to carry over or delete
            return None
        return session

    def _remaining(self, created: float, now: float) -> int:
        # Rounded up: the server-side check is exact, the cookie must not die before it.
        return max(1, math.ceil(self.settings.max_age - (now - created)))


def _cleared(session: Session) -> Session:
    session.invalidate()
    return session


def _parse(data: dict[str, Any]) -> UserSession | None:
    """Return the session's contents, or None if they are not what this version writes."""
    sub, email, groups = data.get("sub"), data.get("email"), data.get("groups")
    created, seen, id_token = data.get("created"), data.get("seen"), data.get("idt")
    if data.get("v") != _VERSION or not isinstance(sub, str) or not sub:
        return None
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        return None
    if not isinstance(created, int | float) or not isinstance(seen, int | float):
        return None
    ident = Identity(sub, tuple(groups), email if isinstance(email, str) else None)
    return UserSession(ident, id_token if isinstance(id_token, str) else None, created, seen)
