"""Differential path fuzzing: jitgate's reading of a request target against real routers.

Hypothesis makes request targets from the demo policy's routes (percent-encodings of
every byte, mixed case, dot and empty segments, `;` parameters, Unicode look-alikes,
overlong UTF-8, absolute form, very long segments, queries). Each goes through jitgate's
own normaliser and compiled policy (`paths.split_target`, `paths.normalise`,
`Policy.match`, the `/_jit` prefix), exactly as the gate does. A target jitgate accepts
is forwarded as its normalised path and the query as sent, so that is what the routers
get: Django (its real URL resolver and handlers, in-process through its WSGI handler),
Starlette (its router, in-process, with the path an ASGI server decodes), aiohttp (a real
server) and nginx (`location` matching in a running nginx), the last two over pipelined
keep-alive connections. Every router serves the same routes as the policy; a handler
answers with the scope it serves (`recording:1/demo-1`), `list:project:1` for a project's
list of recordings, `blocked` for the share link or `open` for the rest.

The invariant, per router and target: a handler that serves a scope is reached only by
a target that jitgate decides is protected by that scope or a wider one (or blocks); the
list's handler only by a target jitgate decides by the list route (whose items it checks
against the caller's grants, `lists: annotate`) or blocks; the share link's handler only
by a target jitgate blocks. Targets jitgate refuses (400) or
keeps for itself (`/_jit`) never reach an upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from conftest import free_port
from hypothesis import strategies as st

from proxy import policyfile
from proxy.errors import BadPath
from proxy.paths import normalise, split_target
from proxy.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
POLICY: Policy = policyfile.load(ROOT / "config" / "policy.yaml")
PREFIX = "/_jit"

# --- the targets -------------------------------------------------------------------------

BASES = [
    ["api", "projects", "1", "session_recordings", "demo-1", "snapshots"],
    ["api", "projects", "1", "session_recordings", "demo-1"],
    ["api", "projects", "1", "session_recordings", "demo-1", "sharing"],
    ["api", "projects", "1", "session_recordings"],
    ["replay", "demo-1"],
    ["healthz"],
    ["static", "app.js"],
    ["_jit", "api", "grants"],
]
# Characters that some systems fold into ASCII ones: full-width forms, long s, the Kelvin
# sign, dotless i, Cyrillic letters, slashes and dots that are not '/' and '.'.
LOOKALIKES = {
    "s": ["\u017f", "\uff53", "\u0455"],
    "k": ["\u212a"],
    "i": ["\u0131", "\u0456", "\uff49"],
    "a": ["\u0430", "\uff41"],
    "e": ["\u0435", "\uff45"],
    "o": ["\u043e", "\uff4f"],
    "p": ["\u0440"],
    "c": ["\u0441"],
    "/": ["\uff0f", "\u2215", "\u2044", "\u29f8"],
    ".": ["\uff0e", "\u2024", "\u3002"],
    "_": ["\uff3f"],
    "-": ["\u2010", "\uff0d"],
}
# Overlong UTF-8 (and other invalid sequences) of '/', '.', '\\', 's' and '_'.
OVERLONG = [
    "%C0%AF", "%E0%80%AF", "%F0%80%80%AF", "%C0%AE", "%E0%80%AE", "%C1%9C", "%C1%B3",
    "%C1%9F", "%C0%80", "%C0", "%80", "%ED%A0%80", "%F4%90%80%80", "%FF", "%FE",
]  # fmt: skip
DOT_SEGMENTS = [".", "..", "%2e", "%2E%2e", ".%2E", "%2e.", "...", "%2e%2e%2e"]
HEX = "0123456789abcdef"


def _encode_byte(b: int, upper: bool) -> str:
    text = f"%{b:02X}"
    return text if upper else text.lower()


@st.composite
def _segment(draw: st.DrawFn, seg: str) -> str:
    """One segment, changed in one or more ways."""
    kinds = draw(
        st.lists(
            st.sampled_from(
                [
                    *("keep", "case", "case", "encode", "encode", "byte", "lookalike"),
                    *("lookalike", "overlong", "param", "long"),
                ]
            ),
            min_size=1,
            max_size=3,
        )
    )
    for kind in kinds:
        if kind == "case" and seg:
            seg = "".join(c.upper() if draw(st.booleans()) else c for c in seg)
        elif kind == "encode" and seg:
            upper = draw(st.booleans())
            mask = draw(st.lists(st.booleans(), min_size=len(seg), max_size=len(seg)))
            seg = "".join(
                "".join(_encode_byte(b, upper) for b in c.encode()) if m and c != "%" else c
                for c, m in zip(seg, mask, strict=True)
            )
        elif kind == "byte":
            at = draw(st.integers(0, len(seg)))
            # Any byte, but printable ASCII more often: most others are refused outright.
            value = draw(st.one_of(st.integers(0x20, 0x7E), st.integers(0, 255)))
            byte = _encode_byte(value, draw(st.booleans()))
            seg = seg[:at] + byte + seg[at:]
        elif kind == "lookalike":
            spots = [i for i, c in enumerate(seg) if c.lower() in LOOKALIKES]
            if spots:
                i = draw(st.sampled_from(spots))
                char = draw(st.sampled_from(LOOKALIKES[seg[i].lower()]))
                if draw(st.booleans()):  # percent-encoded UTF-8, else raw
                    char = "".join(_encode_byte(b, True) for b in char.encode())
                seg = seg[:i] + char + seg[i + 1 :]
        elif kind == "overlong":
            at = draw(st.integers(0, len(seg)))
            seg = seg[:at] + draw(st.sampled_from(OVERLONG)) + seg[at:]
        elif kind == "param":
            seg += ";" + draw(st.sampled_from(["", "x=1", "jsessionid=a", "/..", "%2f"]))
        elif kind == "long":
            seg += "a" * draw(st.sampled_from([64, 255, 256, 1024, 2000]))
    return seg


@st.composite
def targets(draw: st.DrawFn) -> str:
    """A request target made from one of the routes, spelled in a tricky way."""
    base = draw(st.sampled_from(BASES))
    segs: list[str] = []
    for seg in base:
        # Before a segment: nothing, empty segments, a dot segment, or junk and '..'.
        extra = draw(st.sampled_from(["", "", "", "empty", "dot", "junk"]))
        if extra == "empty":
            segs.extend([""] * draw(st.integers(1, 2)))
        elif extra == "dot":
            segs.append(draw(st.sampled_from(DOT_SEGMENTS)))
        elif extra == "junk":
            segs.extend([draw(st.sampled_from(["x", "api", "%78", "_jit"])), "%2e%2e"])
        # A third of the segments changed: more targets whole enough to be forwarded.
        segs.append(draw(_segment(seg)) if draw(st.integers(0, 2)) == 0 else seg)
    tail = draw(st.sampled_from(["", "", "/", "/.", "/..", "//", "/%2e", "/x/..", "/%00"]))
    target = "/" + "/".join(segs) + tail
    query = draw(st.sampled_from(["", "", "", "?a=1", "?x=/../../replay", "?%2F", "?", "#f"]))
    form = draw(st.sampled_from(["origin"] * 12 + ["absolute", "backslash", "raw"]))
    if form == "absolute":
        target = draw(st.sampled_from(["http://127.0.0.1", "HTTP://evil.example:80"])) + target
    elif form == "backslash":
        target = target.replace("/", "\\", draw(st.integers(1, 2)))
    elif form == "raw":
        target = target.replace("-", draw(st.sampled_from([" ", "\t", "é", "\x7f"])), 1)
    return target + query


# --- jitgate's reading -------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What jitgate does with a target: refuse it, keep it, or forward `forwarded`."""

    outcome: str  # refused | prefix | protected | blocked | identity | public
    forwarded: str = ""  # the target sent upstream: the normalised path and the query
    scope: str | None = None
    why: str = ""
    listed: bool = False  # a list route: jitgate checks each item's recording (lists.py)


def jitgate_reads(target: str, method: str = "GET") -> Reading:
    """The gate's own steps for a target: split, normalise, the prefix, the policy."""
    try:
        raw_path, query = split_target(target)
        path = normalise(raw_path)
    except BadPath as exc:
        return Reading("refused", why=str(exc))
    low = path.lower()
    if low == PREFIX or low.startswith(PREFIX + "/"):
        return Reading("prefix")
    match = POLICY.match(method, path, query)
    if match.invalid is not None:
        return Reading("refused", why=match.invalid)
    forwarded = path + ("?" + query if query else "")
    listed = match.listing is not None and POLICY.lists != "pass"
    return Reading(str(match.access), forwarded, match.scope, match.route, listed)


def violation(reading: Reading, served: str) -> str | None:
    """Why a router's answer breaks the invariant for jitgate's reading, or None."""
    if served == "blocked" and reading.outcome != "blocked":
        return f"the share link's handler, but jitgate decides {reading.outcome}"
    if served.startswith("list:"):
        if reading.outcome == "blocked" or reading.listed:
            return None
        return f"the list's handler, but jitgate decides {reading.outcome} and checks no item"
    if served.startswith(("recording:", "project:")):
        if reading.outcome == "blocked":
            return None
        if reading.outcome != "protected" or reading.scope is None:
            return f"a handler serving {served}, but jitgate decides {reading.outcome}"
        try:
            granted = unquote(reading.scope, errors="strict")
        except UnicodeDecodeError:
            return f"a handler serving {served}, but jitgate's scope {reading.scope} is not UTF-8"
        if granted not in POLICY.covering(served):
            return f"a handler serving {served}, but jitgate asks for a grant of {granted}"
    return None


# --- the routers ---------------------------------------------------------------------------
# The same routes in each: (name, path with {params}, scope template or blocked/open).


def _django_setup() -> Callable[[str], str]:
    import django
    from django.conf import settings
    from django.http import HttpRequest, HttpResponse
    from django.test import Client
    from django.urls import path, re_path

    def serve(answer: str) -> Callable[..., HttpResponse]:
        def view(request: HttpRequest, **params: str) -> HttpResponse:
            return HttpResponse(answer.format(**params), content_type="text/plain")

        return view

    rec = r"^api/projects/(?P<project>[^/]+)/session_recordings/(?P<recording>[^/]+)"
    urls = [
        path("healthz", serve("open")),
        re_path(r"^static/", serve("open")),
        re_path(rec + r"/sharing(?:/.*)?$", serve("blocked")),
        re_path(r"^api/projects/(?P<project>[^/]+)/session_recordings/?$",
                serve("list:project:{project}")),
        re_path(rec + r"(?:/.*)?$", serve("recording:{project}/{recording}")),
        re_path(r"^replay/(?P<recording>[^/]+)/?$", serve("recording:1/{recording}")),
        re_path(r"", serve("open")),
    ]  # fmt: skip
    import sys
    import types

    module = types.ModuleType("jitgate_pathfuzz_urls")
    module.urlpatterns = urls  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="django-insecure-test-only-0123456789abcdefghijklmnop",
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=module.__name__,
            MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
            INSTALLED_APPS=[],
            DATABASES={},
        )
        django.setup()
    client = Client()

    def route(forwarded: str) -> str:
        response = client.get(forwarded)
        if response.status_code != 200:
            return f"status {response.status_code}"
        return str(response.content.decode())

    return route


def _starlette_setup() -> Callable[[str], str]:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, Router

    def serve(answer: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> PlainTextResponse:
            return PlainTextResponse(answer.format(**request.path_params))

        return endpoint

    rec = "/api/projects/{project}/session_recordings/{recording}"
    router = Router(
        [
            Route("/healthz", serve("open")),
            Route("/static/{rest:path}", serve("open")),
            Route(rec + "/sharing", serve("blocked")),
            Route(rec + "/sharing/{rest:path}", serve("blocked")),
            Route("/api/projects/{project}/session_recordings", serve("list:project:{project}")),
            Route(rec, serve("recording:{project}/{recording}")),
            Route(rec + "/{rest:path}", serve("recording:{project}/{recording}")),
            Route("/replay/{recording}", serve("recording:1/{recording}")),
            Route("/{rest:path}", serve("open")),
        ]
    )

    loop = asyncio.new_event_loop()

    def route(forwarded: str) -> str:
        raw, _, query = forwarded.partition("?")
        # What uvicorn and hypercorn put in the scope: the path percent-decoded as UTF-8.
        scope = {
            "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": unquote(raw), "raw_path": raw.encode(), "root_path": "",
            "query_string": query.encode(), "headers": [(b"host", b"upstream")],
            "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
        }  # fmt: skip
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        loop.run_until_complete(router(scope, receive, send))
        status = sent[0]["status"]
        if status != 200:
            return f"status {status}"
        return str(b"".join(m.get("body", b"") for m in sent[1:]).decode())

    return route


def _aiohttp_app() -> Any:
    from aiohttp import web

    def serve(answer: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=answer.format(**request.match_info))

        return handler

    rec = "/api/projects/{project}/session_recordings/{recording}"
    app = web.Application()
    add = app.router.add_get
    add("/healthz", serve("open"))
    add("/static/{rest:.*}", serve("open"))
    add(rec + "/sharing{rest:(/.*)?}", serve("blocked"))
    add("/api/projects/{project}/session_recordings{slash:/?}", serve("list:project:{project}"))
    add(rec + "{rest:(/.*)?}", serve("recording:{project}/{recording}"))
    add("/replay/{recording}{slash:/?}", serve("recording:1/{recording}"))
    add("/{rest:.*}", serve("open"))
    return app


NGINX_SITE = r"""
server {
    listen 127.0.0.1:%(port)d;
    default_type text/plain;
    location = /healthz { return 200 "open"; }
    location /static/ { return 200 "open"; }
    location ~ ^/api/projects/([^/]+)/session_recordings/([^/]+)/sharing(/|$) {
        return 200 "blocked";
    }
    location ~ ^/api/projects/([^/]+)/session_recordings/?$ { return 200 "list:project:$1"; }
    location ~ ^/api/projects/([^/]+)/session_recordings/([^/]+) {
        return 200 "recording:$1/$2";
    }
    # Case-insensitive, as some configs are written.
    location ~* ^/replay/([^/]+)/?$ { return 200 "recording:1/$1"; }
    location / { return 200 "open"; }
}
"""


# --- pipelined keep-alive requests ------------------------------------------------------------


async def _one_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "connection" and "close" in value.lower():
            close = True
    return status, await reader.readexactly(length), close


async def route_over_http(port: int, forwarded: list[str], *, batch: int = 64) -> list[str]:
    """Send each target as a GET on keep-alive connections, pipelined; each one's answer."""
    answers: list[str] = []
    todo = list(forwarded)
    while todo:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while todo:
                chunk = todo[:batch]
                writer.write(
                    b"".join(
                        f"GET {t} HTTP/1.1\r\nHost: upstream\r\n\r\n".encode("latin-1")
                        for t in chunk
                    )
                )
                got = 0
                for _ in chunk:
                    try:
                        status, body, close = await _one_response(reader)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        # The server closed after an error answer: carry on afresh.
                        answers.append("status closed")
                        got += 1
                        break
                    text = body.decode("utf-8", "replace")
                    answers.append(text if status == 200 else f"status {status}")
                    got += 1
                    if close:
                        break
                del todo[:got]
                if got < len(chunk):
                    break
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return answers


@contextlib.asynccontextmanager
async def aiohttp_upstream() -> AsyncIterator[int]:
    from aiohttp import web

    # Lines over aiohttp's limit are answered 400 with a logged traceback: not news here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    runner = web.AppRunner(_aiohttp_app(), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def nginx_upstream() -> Iterator[int]:
    from nginxkit import Nginx

    port = free_port()
    nginx = Nginx(NGINX_SITE % {"port": port}, port)
    nginx.start()
    try:
        yield port
    finally:
        nginx.stop()


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Report:
    targets: int = 0
    refused: int = 0
    prefix: int = 0
    forwarded: set[str] = field(default_factory=set)
    routed: int = 0  # router answers looked at
    protected_served: int = 0  # answers from a handler that serves a scope or the share link
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.targets} targets, {self.refused} refused, {self.prefix} kept under {PREFIX}, "
            f"{len(self.forwarded)} distinct forwarded x 4 routers ({self.routed} answers, "
            f"{self.protected_served} from protected handlers), "
            f"{len(self.violations)} counterexamples"
        )


class Fuzzer:
    """jitgate's reading and the in-process routers' answers, per generated target."""

    def __init__(self) -> None:
        self.report = Report()
        self.readings: dict[str, tuple[str, Reading]] = {}  # forwarded: (target, reading)
        self.in_process = {"django": _django_setup(), "starlette": _starlette_setup()}

    def check(self, target: str) -> None:
        self.report.targets += 1
        reading = jitgate_reads(target)
        if reading.outcome == "refused":
            self.report.refused += 1
            return
        if reading.outcome == "prefix":
            self.report.prefix += 1
            return
        if reading.forwarded in self.report.forwarded:
            return
        self.report.forwarded.add(reading.forwarded)
        self.readings[reading.forwarded] = (target, reading)
        for name, route in self.in_process.items():
            self.judge(name, target, reading, route(reading.forwarded))

    def judge(self, router: str, target: str, reading: Reading, served: str) -> None:
        self.report.routed += 1
        if served == "blocked" or served.startswith(("recording:", "project:", "list:")):
            self.report.protected_served += 1
        why = violation(reading, served)
        if why is not None:
            self.report.violations.append(
                f"{router}: {target!r} -> forwarded {reading.forwarded!r} reached {why}"
            )

    async def over_http(self) -> None:
        """Every distinct forwarded target to a real aiohttp server and a real nginx."""
        forwarded = sorted(self.readings)
        async with aiohttp_upstream() as port:
            self._judge_all("aiohttp", forwarded, await route_over_http(port, forwarded))
        with nginx_upstream() as port:
            self._judge_all("nginx", forwarded, await route_over_http(port, forwarded))

    def _judge_all(self, router: str, forwarded: list[str], answers: list[str]) -> None:
        for sent, served in zip(forwarded, answers, strict=True):
            target, reading = self.readings[sent]
            self.judge(router, target, reading, served)


def sample(examples: int) -> list[str]:
    """The first `examples` targets of the seeded run, as a list."""
    from hypothesis import HealthCheck, given, settings

    out: list[str] = []

    @settings(
        max_examples=examples, derandomize=True, database=None, deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(targets())
    def each(target: str) -> None:
        out.append(target)

    each()
    return out


def fuzz(examples: int) -> Report:
    """Generate `examples` targets (seeded: the same ones each run) and judge every one."""
    fuzzer = Fuzzer()
    for target in sample(examples):
        fuzzer.check(target)
    asyncio.run(fuzzer.over_http())
    return fuzzer.report
