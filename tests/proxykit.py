"""jitgate running in this process in front of a given upstream, outside pytest's fixtures:
for the `harden/` checks, and for tests that measure the same way they do."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import write_config

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.listener import server_options
from proxy.state import STATE, State

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"  # protected, in the demo policy
SCOPE = "recording:1/demo-1"


@contextlib.asynccontextmanager
async def running(
    upstream_url: str,
    redis_url: str,
    *,
    extra: str = "",
    tmp: Path | None = None,
    read_timeout: float = 5,
    listen: str = "",
) -> AsyncIterator[tuple[TestServer, State, Path]]:
    """Start jitgate (the demo policy, test identities) on a free port; yield its server,
    its state and its directory (audit.jsonl is there)."""
    with contextlib.ExitStack() as stack:
        if tmp is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jitgate-")))
        cfg = write_config(
            tmp, upstream_url=upstream_url, redis_url=redis_url, extra=extra,
            read_timeout=read_timeout, listen=listen,
        )  # fmt: skip
        settings = settings_mod.load(cfg, environ={})
        app = build_app(settings)
        server = TestServer(app)
        await server.start_server(**server_options(settings.listen))  # as `jitgate serve`
        try:
            yield server, app[STATE], tmp
        finally:
            await server.close()


@contextlib.asynccontextmanager
async def plain_upstream() -> AsyncIterator[str]:
    """A real upstream that answers every request with a small JSON body; yields its URL."""

    async def anything(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"path": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
