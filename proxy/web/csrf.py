"""CSRF tokens and flash messages for jitgate's forms, both bound to the signed-in browser.

A form token is `issued.hmac(key, binding|issued)`. The binding names the credential the
browser signed in with, not only the person: a browser session gives its subject and
sign-in time (a new sign-in, a new binding), the token cookie a hash of that token (a new
token, a new binding), an SSO proxy's headers the subject. Another site can make the
browser send its cookies but cannot read a page, so it never sees a token; and a token
from the attacker's own sign-in names the attacker's credential, not the victim's.

The key is one random value in Redis (SET NX), so every replica and every restart agrees
on it without configuration; it is cached here and read again once when a token does
not verify, in case Redis was emptied and another replica made a new one.

A flash message (the outcome of a form, shown once by the page the form redirects to) is
carried in a short-lived cookie signed the same way, so no other page or site can put
words on jitgate's pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from ..identity import Identity
from ..state import app_state

FIELD = "csrf"
FLASH_COOKIE = "jitgate_flash"
LIFETIME = 12 * 3600.0  # a form left open longer than a working day needs a reload
_SKEW = 60.0
_FLASH_AGE = 60


@dataclass(frozen=True)
class Visitor:
    """Who a request is from, and the credential its form tokens are bound to."""

    identity: Identity
    source: str  # bearer, session, cookie, headers or assertion (identity.verifier.Found)
    binding: str


class KeyCache:
    """The CSRF key, read from Redis once per process (and again after a mismatch)."""

    def __init__(self) -> None:
        self.key: bytes | None = None

    async def get(self, request: web.Request, *, fresh: bool = False) -> bytes:
        if self.key is not None and not fresh:
            return self.key
        redis = app_state(request).redis
        name = f"{app_state(request).settings.redis.key_prefix}csrf:key"
        await redis.set(name, secrets.token_hex(32), nx=True)
        raw = await redis.get(name)
        if raw is None:  # emptied between the two calls: use one of our own this time
            raw = secrets.token_hex(32)
        self.key = raw if isinstance(raw, bytes) else str(raw).encode()
        return self.key


KEYS = web.AppKey("csrf_keys", KeyCache)


async def visitor(request: web.Request) -> Visitor | None:
    """Return who is signed in and how, or None (no credential, or a bad one)."""
    st = app_state(request)
    found = (await st.identify(request)).found
    if found is None:
        return None
    ident = found.identity
    binding = f"{found.source}|{ident.subject}"
    if found.source == "session" and st.sessions is not None:
        session = await st.sessions.read(request)  # cached for the request by identify
        if session is not None:
            binding += f"|{session.created!r}"
    elif found.source == "cookie":
        name = st.settings.identity.cookie or ""
        binding += "|" + hashlib.sha256(request.cookies.get(name, "").encode()).hexdigest()
    return Visitor(ident, found.source, binding)


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "|".join(parts).encode(), hashlib.sha256).hexdigest()


async def token(request: web.Request, who: Visitor) -> str:
    """Return a fresh form token for this visitor."""
    key = await request.config_dict[KEYS].get(request)
    issued = str(int(time.time()))
    return f"{issued}.{_mac(key, 'csrf', who.binding, issued)}"


async def valid(request: web.Request, who: Visitor, value: str) -> bool:
    """Whether a submitted token was issued to this visitor's credential, and recently."""
    issued, _, mac = value.partition(".")
    if not issued.isdigit() or not mac:
        return False
    age = time.time() - int(issued)
    if age > LIFETIME or age < -_SKEW:
        return False
    keys = request.config_dict[KEYS]
    for fresh in (False, True):
        key = await keys.get(request, fresh=fresh)
        if hmac.compare_digest(mac, _mac(key, "csrf", who.binding, issued)):
            return True
    return False


async def set_flash(
    request: web.Request, response: web.StreamResponse, who: Visitor, kind: str, text: str
) -> None:
    """Carry one message ("ok" or "error") to the next page this visitor opens."""
    key = await request.config_dict[KEYS].get(request)
    body = base64.urlsafe_b64encode(json.dumps([kind, text[:500]]).encode()).decode()
    response.set_cookie(
        FLASH_COOKIE,
        f"{body}.{_mac(key, 'flash', who.binding, body)}",
        max_age=_FLASH_AGE,
        path=f"{app_state(request).settings.prefix}/",
        httponly=True,
        samesite="Lax",
        secure=request.secure,
    )


async def read_flash(request: web.Request, who: Visitor) -> tuple[str, str] | None:
    """Return the message waiting for this visitor, if it is theirs and intact."""
    value = request.cookies.get(FLASH_COOKIE)
    if not value:
        return None
    body, _, mac = value.rpartition(".")
    key = await request.config_dict[KEYS].get(request)
    if not hmac.compare_digest(mac, _mac(key, "flash", who.binding, body)):
        return None
    try:
        kind, text = json.loads(base64.urlsafe_b64decode(body))
    except (ValueError, binascii.Error, TypeError):
        return None
    if kind not in ("ok", "error") or not isinstance(text, str):
        return None
    return kind, text


def clear_flash(request: web.Request, response: web.StreamResponse) -> None:
    """Drop a shown (or unusable) message, so a reload does not show it again."""
    if FLASH_COOKIE in request.cookies:
        response.del_cookie(FLASH_COOKIE, path=f"{app_state(request).settings.prefix}/")
