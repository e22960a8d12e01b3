"""jitgate running in this process in front of a given upstream, outside pytest's fixtures:
for the `harden/` checks, and for tests that measure the same way they do."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
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


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


class LogCount(logging.Handler):
    """Counts the records `match` picks out, and keeps the first line of every ERROR (or
    of anything logged with a traceback)."""

    def __init__(self, match: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__(logging.WARNING)
        self.match = match
        self.matched = 0
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.errors.append(f"{record.name}: {record.getMessage().splitlines()[0][:200]}")
        elif self.match(record):
            self.matched += 1


@contextlib.contextmanager
def counting_logs(match: Callable[[logging.LogRecord], bool]) -> Iterator[LogCount]:
    """Count the log records of WARNING and above while inside (whatever else handles them)."""
    count, root = LogCount(match), logging.getLogger()
    level = root.level
    root.addHandler(count)
    root.setLevel(logging.WARNING)
    try:
        yield count
    finally:
        root.removeHandler(count)
        root.setLevel(level)
