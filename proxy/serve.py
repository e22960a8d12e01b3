"""Serving one jitgate process: the event loop, the listener and a clean stop.

`jitgate serve` runs `run`; with `--workers N` each worker serves the same way
(workers.py), on its own SO_REUSEPORT listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .app import build_app
from .listener import server_options
from .settings import Settings

log = logging.getLogger("jitgate")


def run(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, on uvloop where it is installed."""
    app = build_app(settings)
    app.on_startup.append(freeze_startup_objects)  # after every resource has started
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        for level, line in speedups(runner.get_loop()):
            log.log(level, "%s", line)
        runner.run(_serve(app, settings))


async def _serve(app: web.Application, settings: Settings) -> None:
    async with serving(app, settings) as (_, stop):
        log.info(
            "jitgate listening on http://%s:%d -> %s",
            settings.listen.host, settings.listen.port, settings.upstream.url,
        )  # fmt: skip
        await stop.wait()
        log.info("jitgate stopping")


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, settings: Settings, *, reuse_port: bool = False, **runner: Any
) -> AsyncIterator[tuple[web.TCPSite, asyncio.Event]]:
    """Serve `app` on `listen` with the listener's limits; yield the site and an event that
    SIGTERM or SIGINT sets; clean the app up on the way out.

    Not web.run_app: there a second signal (Ctrl-C reaches `make demo`'s launcher too,
    which then sends SIGTERM) breaks off the shutdown before the audit log is closed.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # a second signal changes nothing
    app_runner = web.AppRunner(app, access_log=None, **runner, **server_options(settings.listen))
    await app_runner.setup()
    try:
        host, port = settings.listen.host, settings.listen.port
        site = web.TCPSite(app_runner, host, port, reuse_port=reuse_port)
        await site.start()
        yield site, stop
    finally:
        await app_runner.cleanup()


async def freeze_startup_objects(app: web.Application) -> None:
    """Move what start-up made out of the garbage collector's sight, for good.

    A full collection walks every tracked object; under load one ran every second or two
    and took 30 to 45 ms with start-up's objects in it (about 2 ms without), stalling
    every request in flight (docs/benchmark.md).
    """
    gc.collect()
    gc.freeze()
    log.info("start-up objects frozen for the garbage collector: %d", gc.get_freeze_count())


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a dependency on Linux and macOS), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def speedups(loop: asyncio.AbstractEventLoop) -> list[tuple[int, str]]:
    """Say which event loop and HTTP parser serve, with a log level: slow ones warn."""
    from aiohttp import http_parser

    out = []
    if type(loop).__module__.startswith("uvloop"):
        out.append((logging.INFO, "using the uvloop event loop"))
    else:
        out.append((logging.WARNING, "uvloop is not installed: asyncio's slower loop serves"))
    if http_parser.HttpRequestParser.__module__.endswith("_http_parser"):
        out.append((logging.INFO, "using aiohttp's C HTTP parser (llhttp)"))
    else:
        why = "a pure-Python wheel, or AIOHTTP_NO_EXTENSIONS is set"
        out.append((logging.WARNING, f"aiohttp's C HTTP parser is not loaded ({why})"))
    return out
