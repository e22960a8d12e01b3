"""Shared parts of the OIDC sign-in tests: a config for the test IdP, a scripted browser."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urljoin

import aiohttp
from conftest import write_config
from cryptography.fernet import Fernet
from idp import Idp

KEY_1 = Fernet.generate_key().decode()
KEY_2 = Fernet.generate_key().decode()
HTML = {"Accept": "text/html,application/xhtml+xml"}
SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"


def oidc_config(
    tmp: Path,
    *,
    idp: Idp,
    base: str,
    upstream_url: str,
    redis_url: str | None,
    session: str = "",
    oidc: str = "",
) -> Path:
    """A config whose identity section adds OIDC sign-in against `idp` for jitgate at `base`."""
    cfg = write_config(tmp, upstream_url=upstream_url, redis_url=redis_url)
    block = (
        "identity:\n"
        f"  oidc: {{issuer: '{idp.issuer}', client_id: jitgate, "
        f"client_secret: '{idp.client_secret}', public_url: '{base}', "
        f"scopes: [openid, email, groups], {oidc}}}\n"
        f"  session: {{keys: ['{KEY_1}'], secure: false, {session}}}\n"
    )
    cfg.write_text(cfg.read_text().replace("identity:\n", block, 1))
    return cfg


def browser() -> aiohttp.ClientSession:
    # unsafe=True: the default jar drops cookies set by an IP-address host.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def start_login(s: aiohttp.ClientSession, base: str, path: str) -> str:
    """Open `path` as a browser without a session; return the IdP authorization URL."""
    async with s.get(base + path, headers=HTML, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        login = urljoin(base, r.headers["Location"])
    assert login.startswith(f"{base}/_jit/oidc/login?next=")
    return await authorize_url(s, login)


async def authorize_url(s: aiohttp.ClientSession, login: str) -> str:
    async with s.get(login, headers=HTML, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        return r.headers["Location"]


async def sign_in(
    s: aiohttp.ClientSession, idp: Idp, base: str, path: str, user: str = "alice"
) -> str:
    """Run the whole sign-in from `path`; return where jitgate sent the browser afterwards."""
    auth = await start_login(s, base, path)
    callback = await idp.sign_in(s, auth, f"{base}/_jit/oidc/callback", user)
    async with s.get(callback, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        return r.headers["Location"]
