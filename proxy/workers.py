"""`jitgate serve --workers N`: N worker processes on one port under one supervisor.

Each worker is a whole jitgate (the same app, resources and cleanup as one process) with
its own SO_REUSEPORT listener, so the kernel spreads new connections over the workers.
The supervisor serves nothing. It validates nothing either (the CLI has done that before
it starts), but it:

- reserves the port (a bound, never listening, SO_REUSEPORT socket: a port taken by
  another program fails here, once, and `listen.port: 0` picks one port for all);
- empties the prometheus-client multiprocess directory and points every worker at it;
- starts the embedded redis-server once (when no Redis is configured) and gives every
  worker its URL, and stops it last, after every worker has closed its audit log;
- starts the workers and waits until each listens: one that exits first fails the whole
  start (exit 1), so a start-up error is reported once instead of restarting for ever;
- restarts a worker that dies afterwards, with a backoff, logged and counted
  (`jitgate_worker_restarts_total`);
- on SIGTERM or SIGINT sends each worker one SIGTERM: each stops accepting, finishes the
  requests in flight, then closes its resources and audit log as one process does;
- passes SIGHUP (reload the policy) on to every worker.

Workers run in their own session, so a Ctrl-C in a terminal reaches the supervisor only,
and each worker gets exactly one SIGTERM. A worker whose supervisor is gone drains and
exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .metrics import SupervisorMetrics
    from .settings import Settings

log = logging.getLogger("jitgate.workers")

READY = b"ready\n"
_START_WITHIN = 60.0  # seconds for a worker to listen (its issuers' keys are fetched first)
_BACKOFF_MIN = 0.2
_BACKOFF_MAX = 10.0
_STABLE_AFTER = 30.0  # a worker up this long restarts quickly again if it dies
_SHUTDOWN_TIMEOUT = 60.0  # what a worker gives requests in flight (aiohttp's default)
_STOP_GRACE = _SHUTDOWN_TIMEOUT + 30.0  # ... plus its audit log and other resources
_SAMPLE_EVERY = 1.0  # seconds between a worker's copies of its gauges into its files


def metrics_dir(settings: Settings) -> Path:
    """Return the prometheus-client multiprocess directory of this state_dir."""
    return settings.state_dir.absolute() / "metrics"


# --- the supervisor -----------------------------------------------------------------------


@dataclass
class _Worker:
    slot: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = _BACKOFF_MIN
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class StartFailed(RuntimeError):
    """A worker could not start: the supervisor stops and exits non-zero."""


def supervise(settings: Settings, count: int, worker_argv: list[str]) -> int:
    """Run `count` workers until SIGTERM or SIGINT; return the exit code.

    `worker_argv` is the command of one worker, without its slot and readiness pipe.
    """
    directory = metrics_dir(settings)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # before prometheus-client loads
    from . import metrics

    if not metrics.multiprocess():  # pragma: no cover - an import order mistake
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR")
    metrics.clean_multiprocess_dir(directory)
    supervisor = Supervisor(settings, count, worker_argv, directory, metrics.SupervisorMetrics())
    return asyncio.run(supervisor.run())


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        count: int,
        worker_argv: list[str],
        directory: Path,
        m: SupervisorMetrics,
    ) -> None:
        self.settings = settings
        self.workers = [_Worker(slot) for slot in range(count)]
        self.argv = worker_argv
        self.dir = directory
        self.metrics = m
        self.env = dict(os.environ)
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        from . import redisd

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        listen = self.settings.listen
        try:
            reserved, port = reserve_port(listen.host, listen.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", listen.host, listen.port, exc)
            return 1
        self.env["JITGATE_LISTEN__PORT"] = str(port)
        embedded = None
        try:
            if self.settings.redis.embedded:
                embedded = redisd.EmbeddedRedis(self.settings.state_dir)
                url = await embedded.start()
                log.info("embedded redis-server running on %s, shared by the workers", url)
                self.env["JITGATE_REDIS__URL"] = url
            code = await self._serve(listen.host, port)
        finally:
            if not await self._stop_all():
                code = 1
            if embedded is not None:
                await embedded.stop()  # last: every worker has closed its audit log
            for sock in reserved:
                sock.close()
        return code

    async def _serve(self, host: str, port: int) -> int:
        try:
            await self._start_all()
        except StartFailed as exc:
            log.error("workers could not start: %s", exc)
            return 1
        if self.stopping.is_set():
            return 0
        log.info(
            "jitgate listening on http://%s:%d -> %s with %d workers (pids %s)",
            host, port, self.settings.upstream.url, len(self.workers),
            " ".join(str(w.proc.pid) for w in self.workers if w.proc is not None),
        )  # fmt: skip
        for w in self.workers:
            w.task = asyncio.create_task(self._keep(w), name=f"worker-{w.slot}")
        await self.stopping.wait()
        log.info("stopping: draining %d workers", len(self.workers))
        return 0

    async def _start_all(self) -> None:
        """Start every worker; raise StartFailed as soon as one fails (the rest are stopped
        by _stop_all); return early if asked to stop meanwhile."""
        tasks = [asyncio.ensure_future(self._spawn(w)) for w in self.workers]
        starts = asyncio.gather(*tasks)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            waits: list[asyncio.Future[Any]] = [starts, stop]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not stop.done():
                starts.result()
        finally:
            stop.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)

    async def _spawn(self, w: _Worker) -> None:
        """Start one worker and wait until it listens; raise StartFailed if it does not."""
        read_fd, write_fd = os.pipe()
        argv = [*self.argv, "--worker-slot", str(w.slot), "--ready-fd", str(write_fd)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.env,
                pass_fds=(write_fd,),
                start_new_session=True,  # signals come from the supervisor, once
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        w.proc, w.started = proc, time.monotonic()
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        try:
            # READY once it listens; the end of the pipe if it exits first.
            line = await asyncio.wait_for(reader.readline(), _START_WITHIN)
        except TimeoutError:
            line = b""
            log.error("worker %d (pid %d) did not listen within %gs", w.slot, proc.pid,
                      _START_WITHIN)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            transport.close()
        if line != READY:
            code = await proc.wait()
            self._gone(proc.pid)
            raise StartFailed(f"worker {w.slot} (pid {proc.pid}) exited with code {code}")
        self.metrics.workers.inc()
        log.info("worker %d (pid %d) is serving", w.slot, proc.pid)

    async def _keep(self, w: _Worker) -> None:
        """Restart the worker each time it dies, with a growing backoff, until stopping."""
        while True:
            assert w.proc is not None
            proc = w.proc
            code = await proc.wait()
            self.metrics.workers.dec()
            self._gone(proc.pid)
            if self.stopping.is_set():
                return
            if time.monotonic() - w.started >= _STABLE_AFTER:
                w.backoff = _BACKOFF_MIN
            self.metrics.restarts.inc()
            log.error(
                "worker %d (pid %d) exited unexpectedly (code %d); restarting in %.1fs",
                w.slot, proc.pid, code, w.backoff,
            )  # fmt: skip
            while True:
                await asyncio.sleep(w.backoff)
                w.backoff = min(w.backoff * 2, _BACKOFF_MAX)
                if self.stopping.is_set():
                    return
                try:
                    await self._spawn(w)
                    break
                except Exception as exc:  # StartFailed, or the command cannot run at all
                    self.metrics.restarts.inc()
                    log.error("restarting worker %d failed: %s; trying again in %.1fs",
                              w.slot, exc, w.backoff)  # fmt: skip

    def _reload(self) -> None:
        """SIGHUP reloads the policy in each worker, as it does in one process."""
        pids = [w.proc.pid for w in self.workers if w.proc and w.proc.returncode is None]
        log.info("SIGHUP: reloading the policy in workers %s", " ".join(map(str, pids)))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _gone(self, pid: int) -> None:
        from . import metrics

        metrics.process_dead(pid, self.dir)

    async def _stop_all(self) -> bool:
        """Send each live worker one SIGTERM and wait for all; kill those past the grace.
        Return False if one had to be killed."""
        clean = True
        self.stopping.set()
        keepers = [w.task for w in self.workers if w.task is not None]
        for task in keepers:  # first, so that none starts a worker after this
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if live:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in live], timeout=_STOP_GRACE)
            for proc in live:
                if proc.returncode is None:
                    log.error("worker pid %d still running %gs after SIGTERM: killed", proc.pid,
                              _STOP_GRACE)  # fmt: skip
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    clean = False
                elif proc.returncode != 0:
                    log.warning("worker pid %d exited with code %d", proc.pid, proc.returncode)
        for proc in live:
            self.metrics.workers.dec()
            self._gone(proc.pid)
        if live:
            log.info("all workers stopped")
        return clean


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind (never listen) SO_REUSEPORT sockets on every address of host; return them and
    the port, the one the kernel picked if `port` is 0. The workers bind the same."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )  # fmt: skip
    seen: set[tuple[int, object]] = set()
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, port


# --- a worker -----------------------------------------------------------------------------


def serve_worker(settings: Settings, slot: int, ready_fd: int) -> None:
    """Serve as worker `slot` until SIGTERM; write READY to ready_fd once listening."""
    from . import serve
    from .app import build_app

    application = build_app(settings)
    with asyncio.Runner(loop_factory=serve.new_event_loop) as runner:
        for level, line in serve.speedups(runner.get_loop()):
            log.log(level, "%s", line)
        runner.run(_serve(application, settings, slot, ready_fd))


async def _serve(app: web.Application, settings: Settings, slot: int, ready_fd: int) -> None:
    from . import serve

    app.cleanup_ctx.append(_sampler)
    app.on_startup.append(serve.freeze_startup_objects)
    parent = os.getppid()
    serving = serve.serving(app, settings, reuse_port=True, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    async with serving as (site, stop):
        watcher = asyncio.create_task(_watch_parent(parent, stop), name="parent-watch")
        try:
            os.write(ready_fd, READY)
            os.close(ready_fd)
            log.info("worker %d (pid %d) listening on %s", slot, os.getpid(), site.name)
            await stop.wait()
            log.info("worker %d (pid %d) draining", slot, os.getpid())
        finally:
            watcher.cancel()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Drain and exit if the supervisor is gone (its workers then belong to init)."""
    while os.getppid() == parent:  # noqa: ASYNC110 (nothing announces a parent's death)
        await asyncio.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: draining", parent)
    stop.set()


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    """Copy this worker's gauges into its metrics files every second: a scrape that another
    worker answers reads them there."""
    from .state import STATE
    from .web import ops

    state = app[STATE]

    async def forever() -> None:
        while True:
            try:
                ops.sample(state)
                state.metrics.refresh()
            except Exception:  # a metric must never stop a worker
                log.exception("sampling the metrics failed")
            await asyncio.sleep(_SAMPLE_EVERY)

    task = asyncio.create_task(forever(), name="metrics-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def worker_command() -> list[str]:
    """The interpreter and module that run this jitgate, for a worker."""
    return [sys.executable, "-m", "proxy.cli"]
