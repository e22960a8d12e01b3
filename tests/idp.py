"""A real OpenID Provider for tests: `node tests/idp/server.js` (the certified oidc-provider).

    from idp import Idp, idp_fixture
    idp = idp_fixture("idp", scope="module")   # in a test module: node starts once

    async def test_login(idp: Idp) -> None:
        tokens = await idp.login("alice")      # authorization code + PKCE, no browser
        ...

No browser is needed to log in: `Idp.login` drives the provider's development login page
(devInteractions) with a plain aiohttp client and a cookie jar. It follows the redirects
by hand from /auth to the /interaction/<uid> page, posts that page's form
(prompt=login, login=<name>, any password), follows the redirects back through /auth
until the provider redirects to the client's redirect_uri with ?code=, and then redeems
the code with the PKCE verifier at the token endpoint. Every client is first-party, so
the provider grants its scopes without a consent page (a consent form, if one ever
shows, is posted the same way).

The provider's test-only endpoints (see server.js) rotate its signing keys, count JWKS
requests and switch the JWKS endpoint to 503.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import jwt
import pytest
from npmkit import NpmError, npm_ci

IDP_DIR = Path(__file__).resolve().parent / "idp"
DEFAULT_REDIRECT_URIS = ("http://127.0.0.1:9/callback",)  # never contacted: we stop at it
CLIENT_SECRET = "jitgate-test-client-secret"


class IdpError(RuntimeError):
    """The test IdP could not be installed, started or driven."""


def node_binary() -> str:
    """Return the path of `node`, or raise IdpError saying how to get it."""
    node = shutil.which("node")
    if node is None:
        raise IdpError(
            "node is not on PATH: the OIDC tests run a real provider (oidc-provider) "
            "and need Node.js 20 or later with npm (Debian/Ubuntu: apt-get install nodejs npm)"
        )
    return node


@functools.cache  # once per node binary: start_idp calls it for every provider
def _check_node_version(node: str) -> None:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    try:
        major = int(out.strip().lstrip("v").split(".")[0])
    except ValueError:
        raise IdpError(f"cannot tell the version of {node}: {out!r}") from None
    if major < 20:
        raise IdpError(f"{node} is Node.js {out.strip()}; the test IdP needs 20 or later")


def ensure_installed() -> None:
    """Install the IdP's npm packages once: `npm ci` from the lock file, skipped when current."""
    _check_node_version(node_binary())
    try:
        npm_ci(IDP_DIR)
    except NpmError as exc:
        raise IdpError(str(exc)) from exc


@dataclass(frozen=True)
class Tokens:
    """What the token endpoint returned for one login."""

    id_token: str
    access_token: str
    refresh_token: str | None
    raw: dict[str, Any]

    @property
    def id_claims(self) -> dict[str, Any]:
        """The ID token's claims, unverified (verifying them is what the tests are for)."""
        claims: dict[str, Any] = jwt.decode(self.id_token, options={"verify_signature": False})
        return claims


class _Form(HTMLParser):
    """The first form of a page: its action and its inputs' default values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action, self._in_form = a.get("action", ""), True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _form(html: str) -> _Form:
    parser = _Form()
    parser.feed(html)
    return parser


def _basic(user: str, password: str) -> str:
    # client_secret_basic (RFC 6749 2.3.1); our ids and secrets need no form-encoding.
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Idp:
    """A running test IdP; its async helpers open their own aiohttp client per call."""

    issuer: str
    port: int
    redirect_uris: tuple[str, ...]
    ready: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log_path: Path
    client_secret: str = CLIENT_SECRET
    _discovery: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    def log(self) -> str:
        """The provider's stderr so far (its warnings and server errors)."""
        return self.log_path.read_text(errors="replace")

    async def discovery(self) -> dict[str, Any]:
        """The provider's /.well-known/openid-configuration."""
        if self._discovery is None:
            self._discovery = await self._json("GET", "/.well-known/openid-configuration")
        return self._discovery

    async def login(
        self,
        username: str,
        *,
        client_id: str = "jitgate",
        scope: str = "openid email groups profile",
        redirect_uri: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> Tokens:
        """Log `username` in through authorization code + PKCE (S256) and return the tokens.

        Pass `session` (with `aiohttp.CookieJar(unsafe=True)`: cookies for an IP address)
        to keep the provider's session cookie, e.g. for `logout` afterwards.
        """
        meta = await self.discovery()
        redirect_uri = redirect_uri or self.redirect_uris[0]
        verifier = secrets.token_urlsafe(48)
        state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        query = urlencode(
            {
                "client_id": client_id,
                "response_type": "code",
                "scope": scope,
                "redirect_uri": redirect_uri,
                "state": state,
                "nonce": nonce,
                "code_challenge": _b64url(hashlib.sha256(verifier.encode()).digest()),
                "code_challenge_method": "S256",
            }
        )
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                # unsafe=True: the default jar drops cookies set by an IP-address host.
                jar = aiohttp.CookieJar(unsafe=True)
                session = await stack.enter_async_context(aiohttp.ClientSession(cookie_jar=jar))
            url = f"{meta['authorization_endpoint']}?{query}"
            callback = await self.sign_in(session, url, redirect_uri, username)
            params = parse_qs(urlsplit(callback).query)
            if "error" in params:
                raise IdpError(f"login refused: {params}")
            if params.get("state") != [state]:
                raise IdpError("login: state does not round-trip")
            if params.get("iss") != [self.issuer]:  # RFC 9207: the response names its issuer
                raise IdpError(f"login: response iss {params.get('iss')}")
            form = {
                "grant_type": "authorization_code",
                "code": params["code"][0],
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
            headers = {}
            if client_id == "jitgate-public":
                form["client_id"] = client_id  # a public client authenticates with PKCE only
            else:
                headers["Authorization"] = _basic(client_id, self.client_secret)
            async with session.post(meta["token_endpoint"], data=form, headers=headers) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise IdpError(f"token endpoint: HTTP {resp.status} {body}")
        tokens = Tokens(body["id_token"], body["access_token"], body.get("refresh_token"), body)
        if tokens.id_claims.get("nonce") != nonce:
            raise IdpError("login: ID token nonce does not match")
        return tokens

    async def sign_in(
        self, session: aiohttp.ClientSession, url: str, redirect_uri: str, username: str
    ) -> str:
        """Sign `username` in from an authorization URL; return the redirect to `redirect_uri`.

        The URL may come from anywhere, e.g. jitgate's own login redirect; the returned
        callback URL (with code, state, iss) is not followed, so the caller delivers it.
        """
        # Follow redirects by hand: the last one goes to the client's redirect_uri, and
        # its query string is what we are after.
        method, data = "GET", None
        for _ in range(12):
            async with session.request(method, url, data=data, allow_redirects=False) as resp:
                if resp.status in (302, 303):
                    url = urljoin(url, resp.headers["Location"])
                    if url.startswith(redirect_uri):
                        return url
                    method, data = "GET", None
                    continue
                page = await resp.text()
                if resp.status != 200:
                    raise IdpError(f"login: HTTP {resp.status} at {url}: {page[:500]}")
            form = _form(page)
            prompt = form.fields.get("prompt")
            if form.action is None or prompt not in ("login", "consent"):
                raise IdpError(f"login: no login or consent form at {url}: {page[:500]}")
            data = dict(form.fields)
            if prompt == "login":
                data.update(login=username, password="any password: devInteractions")
            method, url = "POST", urljoin(url, form.action)
        raise IdpError("login: too many redirects")

    async def logout(self, session: aiohttp.ClientSession, id_token: str) -> str:
        """RP-initiated logout of `session`'s provider session; return where it redirected."""
        meta = await self.discovery()
        query = urlencode(
            {
                "id_token_hint": id_token,
                "post_logout_redirect_uri": self.redirect_uris[0],
                "state": "bye",
            }
        )
        async with session.get(f"{meta['end_session_endpoint']}?{query}") as resp:
            page = await resp.text()
            if resp.status != 200:
                raise IdpError(f"logout: HTTP {resp.status}: {page[:500]}")
        form = _form(page)  # the "Do you want to sign-out?" confirmation
        if form.action is None:
            raise IdpError(f"logout: no confirmation form: {page[:500]}")
        data = {**form.fields, "logout": "yes"}
        async with session.post(
            urljoin(meta["end_session_endpoint"], form.action), data=data, allow_redirects=False
        ) as resp:
            if resp.status not in (302, 303):
                raise IdpError(f"logout: HTTP {resp.status}: {(await resp.text())[:500]}")
            return str(resp.headers["Location"])

    async def client_credentials(self, resource: str = "urn:jitgate:api") -> str:
        """A JWT access token for the service client; `aud` is `resource`.

        `urn:jitgate:api` is signed RS256, `urn:jitgate:api:es256` ES256.
        """
        meta = await self.discovery()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                meta["token_endpoint"],
                data={"grant_type": "client_credentials", "resource": resource, "scope": "api"},
                headers={"Authorization": _basic("jitgate-service", self.client_secret)},
            ) as resp,
        ):
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise IdpError(f"client_credentials: HTTP {resp.status} {body}")
            return str(body["access_token"])

    async def rotate_keys(self, *, retire: bool = False) -> dict[str, str]:
        """New signing keys (new kids) from now on; return the signing kid by algorithm.

        The old keys stay published (tokens already issued still verify) unless `retire`.
        """
        body = await self._json("POST", "/__test/rotate" + ("?retire=1" if retire else ""))
        return dict(body["kids"])

    async def stats(self) -> dict[str, Any]:
        """{"jwks_requests": n, "kids": {alg: kid}, "published": [kid, ...]}."""
        return await self._json("GET", "/__test/stats")

    async def jwks_requests(self) -> int:
        return int((await self.stats())["jwks_requests"])

    async def set_jwks_status(self, status: int) -> None:
        """Make the JWKS endpoint answer `status` (e.g. 503) until set back to 200."""
        await self._json("POST", f"/__test/jwks?status={status}")

    async def _json(self, method: str, path: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.issuer + path) as resp,
        ):
            body: dict[str, Any] = await resp.json(content_type=None)
            if resp.status != 200:
                raise IdpError(f"{method} {path}: HTTP {resp.status} {body}")
            return body

    def stop(self) -> None:
        """Terminate the provider, then kill it if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def start_idp(
    redirect_uris: Sequence[str] = DEFAULT_REDIRECT_URIS,
    *,
    groups: dict[str, list[str]] | None = None,
    startup_timeout: float = 20.0,
) -> Iterator[Idp]:
    """Run the test IdP on a free port (the OS picks it) until the block ends."""
    ensure_installed()
    cmd = [
        node_binary(),
        str(IDP_DIR / "server.js"),
        "--port",
        "0",
        "--exit-with-stdin",
        "--redirect-uris",
        json.dumps(list(redirect_uris)),
    ]
    if groups is not None:
        cmd += ["--groups", json.dumps(groups)]
    fd, log_name = tempfile.mkstemp(prefix="jitgate-idp-", suffix=".log")
    log_path = Path(log_name)
    with open(fd, "wb") as log_file:
        # stdin stays a pipe we hold: if this process dies, node sees EOF and exits.
        proc = subprocess.Popen(
            cmd, cwd=IDP_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file
        )
    lines: queue.Queue[bytes] = queue.Queue()

    def drain() -> None:
        # Read stdout to its end so node can never block on a full pipe.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=drain, name="idp-stdout", daemon=True).start()
    idp: Idp | None = None
    try:
        ready = _wait_ready(lines, proc, startup_timeout, log_path)
        idp = Idp(ready["issuer"], int(ready["port"]), tuple(redirect_uris), ready, proc, log_path)
        yield idp
    finally:
        if idp is not None:
            idp.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)


def _wait_ready(
    lines: queue.Queue[bytes], proc: subprocess.Popen[bytes], timeout: float, log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise IdpError(
                f"IdP not ready after {timeout}s:\n{log_path.read_text()[-2000:]}"
            ) from None
        if not line:
            proc.wait()
            raise IdpError(
                f"IdP exited with {proc.returncode} before it was ready:\n"
                f"{log_path.read_text()[-2000:]}"
            )
        try:
            ready: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        if ready.get("ready"):
            return ready


def idp_fixture(
    name: str = "idp",
    *,
    scope: Any = "session",
    redirect_uris: Sequence[str] = DEFAULT_REDIRECT_URIS,
    **kwargs: Any,
) -> Any:
    """A pytest fixture `name` running one IdP for `scope`; assign it to a module attribute.

    idp = idp_fixture("idp", scope="module")
    """

    def run() -> Iterator[Idp]:
        with start_idp(redirect_uris, **kwargs) as idp:
            yield idp

    return pytest.fixture(run, scope=scope, name=name)
