"""Crashes and Ctrl-C leave a trail that verifies clean, with every answered request in it.

- SIGKILL under load, then a restart, many times in a row: for the JSON-lines file, the
  Redis stream and an HTTP collector (tests/collector.py, a process of its own), verify
  finds 0 errors (every writer closed, or crashed and recovered), and every response the
  client received has its decision record.
- SIGINT to the process group of `jitgate serve` (what Ctrl-C does): the embedded Redis,
  in its own session, is stopped last, after the closing checkpoint; nothing unclosed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, RedisServer, free_port, write_config
from redis.asyncio import Redis
from test_audit_delivery import JITGATE, http_get, upstream_process, wait_ready
from test_cli import run as cli
from waiting import eventually, eventually_sync

from proxy.audit.chain import Verifier, file_lines, stream_entries
from proxy.redisd import EmbeddedRedis

__all__ = ["upstream_process"]  # the fixture, shared with test_audit_delivery

KEY = "crash-test-audit-key-0123456789abcdef-0123"
COLLECTOR = Path(__file__).parent / "collector.py"


def chained_config(tmp: Path, upstream: str, redis_url: str | None, extra: str = "") -> Path:
    return write_config(
        tmp,
        upstream_url=upstream,
        redis_url=redis_url,
        extra=f"  hmac_key: {KEY}\n  checkpoint_interval: 60\n{extra}",
    )


def verifier(lines: Iterable[tuple[str, str]]) -> Verifier:
    """Verify strictly: every writer closed, or crashed and recovered by another."""
    v = Verifier(KEY.encode(), "k1", 60.0, strict=True)
    for loc, text in lines:
        v.feed(loc, text)
    v.finish()
    return v


def decisions(lines: Iterable[tuple[str, str]]) -> list[str]:
    """The paths of the decision records (one per request) among the lines."""
    out = []
    for _, text in lines:
        rec = json.loads(text)
        if rec.get("event") in ("access.allow", "access.deny"):
            out.append(str(rec.get("path")))
    return out


async def stream_lines(redis_url: str, key: str) -> list[tuple[str, str]]:
    redis = Redis.from_url(redis_url)
    try:
        return [x async for x in stream_entries(redis, key)]
    finally:
        await redis.aclose()


class Load:
    """Clients sending requests as fast as they are answered, each to a path of its own."""

    def __init__(self, port: int, run: int, clients: int = 12) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.run = run
        self.clients = clients
        self.received: list[str] = []  # paths whose whole response arrived
        self._n = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def _path(self) -> str:
        i = next(self._n)
        if i % 4 == 3:  # a protected route without a token: a refusal, one record
            return f"/api/projects/1/session_recordings/r{self.run}-{i}/snapshots"
        return f"/static/crash/{self.run}-{i}.css"  # public: decision, then completion

    async def _client(self) -> None:
        assert self._session is not None
        while True:
            path = self._path()
            try:
                async with self._session.get(self.base + path) as resp:
                    await resp.read()
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.01)
                continue
            self.received.append(path)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self._session is not None
        await self._session.close()


def serve(
    cfg: Path,
    port: int,
    env_extra: dict[str, str] | None = None,
    command: list[str] | None = None,
    **popen: object,
) -> subprocess.Popen[bytes]:
    """Start `jitgate serve` (or another command that starts it) and wait until it serves."""
    env = {**os.environ, "JITGATE_LISTEN__PORT": str(port), **(env_extra or {})}
    proc = subprocess.Popen(
        command or [JITGATE, "serve", "--config", str(cfg)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen,  # type: ignore[call-overload]
    )  # fmt: skip
    wait_ready(port, proc)
    return proc


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """tests/collector.py as a process; what it heard goes to a file (a pipe would fill)."""
    port, heard = free_port(), tmp_path / "collector.jsonl"
    with heard.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(COLLECTOR), str(port)], stdout=out)
    try:
        eventually_sync(lambda: http_get(port, "/ingest") == 405, what="the collector to start")
        yield f"http://127.0.0.1:{port}/ingest", heard
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def runs() -> list[object]:
    """The full run (20 kills in a row); AUDIT_CRASH_RUNS=N for another number."""
    return [int(os.environ.get("AUDIT_CRASH_RUNS", "20"))]


@pytest.mark.parametrize("kills", runs())
async def test_sigkill_under_load_again_and_again_loses_nothing_and_verifies_clean(
    tmp_path: Path,
    upstream_process: str,
    redis_server: RedisServer,
    collector: tuple[str, Path],
    kills: int,
) -> None:
    collector_url, heard = collector
    stream = f"crash-{time.time_ns()}"
    cfg = chained_config(
        tmp_path, upstream_process, redis_server.url,
        f"  redis: {{stream: {stream}}}\n  http: [{{name: siem, url: '{collector_url}'}}]\n",
    )  # fmt: skip
    port = free_port()
    received: list[str] = []  # paths whose whole response the client read
    # Each start adopts what the killed one left (replaying it while serving), and is
    # killed in turn under load: a chain of crashes, as a crash-looping deployment has.
    for run in range(kills):
        proc = serve(cfg, port)
        try:
            async with Load(port, run) as load:
                await eventually(lambda: len(load.received) >= 150, what="150 responses")
                proc.send_signal(signal.SIGKILL)  # mid-flight: responses half sent
                proc.wait()
            received += load.received
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    last = serve(cfg, port)
    try:
        spool = tmp_path / "state" / "audit-spool"
        eventually_sync(
            lambda: len(list(spool.iterdir())) == 1, within=60, what="every spool replayed"
        )
        last.send_signal(signal.SIGTERM)
        assert last.wait(timeout=30) == 0
    finally:
        if last.poll() is None:
            last.kill()
            last.wait()

    trails = {
        "file": list(file_lines(tmp_path / "audit.jsonl")),
        "redis": await stream_lines(redis_server.url, "jit:" + stream),
        "collector": list(file_lines(heard)),
    }
    for name, lines in trails.items():
        v = verifier(lines)
        assert v.errors == 0, f"{name}: " + "\n".join(v.text(name))
        states = sorted(w.state() for w in v.writers.values())
        assert len(states) == kills + 1 and states[0] == "closed", states
        assert all(s.startswith("crashed, recovered at seq ") for s in states[1:]), states
        assert not any(w.duplicates for w in v.writers.values()), f"{name}: replayed twice"
        seen = decisions(lines)
        assert len(seen) >= len(received), name
        missing = set(received) - set(seen)
        assert not missing, f"{name}: no decision record for {sorted(missing)[:5]}"


async def test_the_decision_is_spooled_before_the_first_response_byte(
    tmp_path: Path, aiohttp_server: Any, redis_url: str
) -> None:
    """A response that has begun and never ends: a kill now must not lose its decision."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first bytes\n")
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/static/slow.css", slow)
    server = await aiohttp_server(app)
    # A flusher that waits 30 s: only the spool can hold the record when the kill comes.
    cfg = chained_config(tmp_path, str(server.make_url("")).rstrip("/"), redis_url)
    port = free_port()
    proc = serve(cfg, port, env_extra={"JITGATE_AUDIT__FLUSH_INTERVAL": "30"})
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/static/slow.css") as resp,
        ):
            assert await resp.content.readline() == b"first bytes\n"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    spooled = [
        json.loads(line)
        for wal in (tmp_path / "state" / "audit-spool").glob("*/*.wal")
        for line in wal.read_text().splitlines()
    ]
    decided = [r for r in spooled if r["event"] == "access.allow"]
    assert [r["path"] for r in decided] == ["/static/slow.css"]
    assert not [r for r in spooled if r["event"] == "access.done"]  # it never ended


@pytest.mark.parametrize("demo", [False, True], ids=["jitgate-serve", "make-demo"])
async def test_ctrl_c_to_the_process_group_closes_the_trail_before_redis_stops(
    tmp_path: Path, upstream_process: str, demo: bool
) -> None:
    port = free_port()
    if demo:  # the demo launcher starts the replay app on the upstream's port, then jitgate
        upstream = f"http://127.0.0.1:{free_port()}"
        cfg = chained_config(tmp_path, upstream, None)  # the embedded Redis
        launch = [sys.executable, str(ROOT / "deploy" / "demo" / "launch.py")]
        env = {"JITGATE_CONFIG": str(cfg)}
        proc = serve(cfg, port, env, launch, start_new_session=True)
    else:
        cfg = chained_config(tmp_path, upstream_process, None)
        proc = serve(cfg, port, start_new_session=True)  # a group of its own, as a terminal's
    try:
        for i in range(20):
            assert http_get(port, f"/static/ctrl-c-{i}.css") != 0
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: to every process in the group
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "Unclosed" not in log and " ERROR " not in log, log
    assert "stopped redis-server" in log  # it was still running: jitgate stopped it, last

    path = tmp_path / "audit.jsonl"
    out = cli("audit", "verify", "--config", str(cfg), "--file", str(path), "--strict")
    assert out.returncode == 0 and "closed" in out.stdout, out.stdout
    assert len(decisions(file_lines(path))) == 20
    redis = EmbeddedRedis(tmp_path / "state")  # its data, from its append-only file
    await redis.start()
    try:
        out = cli("audit", "verify", "--config", str(cfg), "--redis", "--strict")
    finally:
        await redis.stop()
    assert out.returncode == 0, out.stdout
    assert "1 writers: clean" in out.stdout and ", closed" in out.stdout
