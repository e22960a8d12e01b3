import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from waiting import eventually

from proxy.redisd import (
    MAX_SOCKET_PATH,
    EmbeddedRedis,
    RedisServerMissing,
    redis_url,
    socket_path,
)

MakeRedis = Callable[..., EmbeddedRedis]


def _server_pids(state_dir: Path) -> list[int]:
    """Return the pids of redis-server processes serving state_dir, found via /proc."""
    needle = str(state_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if comm == "redis-server" and needle in cmdline:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A dead but unreaped child is a zombie: count it as gone.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return status != "Z"


def _mode(path: Path) -> int:
    return path.stat().st_mode


def _make_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # tmp_path can exceed the unix socket path limit, so stay short under /tmp.
    root = Path(tempfile.mkdtemp(prefix="jg-redisd-", dir="/tmp"))
    state = root / "state"
    try:
        yield state
    finally:
        # Safety net for failed tests: no redis-server may outlive its test.
        for pid in _server_pids(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def make_redis(state_dir: Path) -> AsyncIterator[MakeRedis]:
    made: list[EmbeddedRedis] = []

    def make(**kwargs: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(state_dir, **kwargs)
        made.append(server)
        return server

    try:
        yield make
    finally:
        # Owners last: stopping an adopter must not take the server down.
        for server in reversed(made):
            with contextlib.suppress(Exception):
                await server.stop()


@contextlib.asynccontextmanager
async def _client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _wait_for(cond: Callable[[], bool], within: float = 15.0) -> None:
    await eventually(cond, within=within)


def test_socket_path_and_url() -> None:
    assert socket_path(Path("/var/lib/jg")) == Path("/var/lib/jg/redis.sock")
    assert redis_url(Path("/var/lib/jg")) == "unix:///var/lib/jg/redis.sock"
    assert redis_url(Path("rel")) == f"unix://{Path.cwd()}/rel/redis.sock"
    # Characters that mean something in a URL are escaped, and redis-py decodes them back.
    assert redis_url(Path("/a b/x#y")) == "unix:///a%20b/x%23y/redis.sock"


async def test_start_ping_set_stop_restart_keeps_data(
    make_redis: MakeRedis, state_dir: Path
) -> None:
    first = make_redis()
    url = await first.start()
    assert url == first.url == redis_url(state_dir)
    assert url.startswith("unix:///")
    pid = first.pid
    assert pid is not None and _server_pids(state_dir) == [pid]
    assert stat.S_IMODE(_mode(state_dir)) == 0o700
    sock = socket_path(state_dir)
    assert stat.S_ISSOCK(_mode(sock))
    assert stat.S_IMODE(_mode(sock)) == 0o700

    async with _client(url) as client:
        assert await client.ping() is True
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
        assert await client.config_get("port") == {"port": "0"}
        events = (await client.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        assert set(events or "") == {"E", "x"}
        await client.set("grant:alice", "replay-42")

    with pytest.raises(RuntimeError, match="already started"):
        await first.start()

    await first.stop()
    assert first.pid is None
    assert not _alive(pid)
    assert not sock.exists()
    assert not (state_dir / "redis.pid").exists()
    await first.stop()  # idempotent

    second = make_redis()
    assert await second.start() == url
    assert second.pid not in (None, pid)
    async with _client(url) as client:
        assert await client.get("grant:alice") == "replay-42"


async def test_supervisor_restarts_killed_child(
    make_redis: MakeRedis, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.redisd")
    server = make_redis()
    url = await server.start()
    async with _client(url) as client:
        await client.set("grant:bob", "replay-7")

    old = server.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await _wait_for(lambda: server.pid not in (None, old))
    new = server.pid
    assert new is not None

    assert server.url == url
    assert _server_pids(state_dir) == [new]
    async with _client(url) as client:
        assert await client.ping() is True
        assert await client.get("grant:bob") == "replay-7"
    assert any(
        "exited unexpectedly" in r.getMessage() and r.levelno == logging.ERROR
        for r in caplog.records
    )

    await server.stop()
    assert not _alive(new)
    assert _server_pids(state_dir) == []


async def test_second_instance_adopts_running_server(
    make_redis: MakeRedis, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.redisd")
    owner = make_redis()
    url = await owner.start()
    pid = owner.pid

    adopter = make_redis()
    assert await adopter.start() == url
    assert adopter.adopted and not owner.adopted
    assert adopter.pid == pid
    assert _server_pids(state_dir) == [pid]
    assert any("adopted" in r.getMessage() for r in caplog.records)

    # The adopter neither supervises nor stops a server it does not own.
    await adopter.stop()
    assert pid is not None and _alive(pid)
    async with _client(url) as client:
        assert await client.ping() is True

    await owner.stop()
    assert not _alive(pid)


async def test_live_pidfile_without_socket_refuses_second_server(
    make_redis: MakeRedis, state_dir: Path
) -> None:
    owner = make_redis()
    await owner.start()
    pid = owner.pid
    # The old server still runs (and owns the AOF) but nothing can reach it through the socket.
    socket_path(state_dir).unlink()

    with pytest.raises(RuntimeError, match="alive but does not answer PING"):
        await make_redis().start(timeout=0.3)
    assert _server_pids(state_dir) == [pid]


async def test_stale_socket_and_pidfile_are_replaced(
    make_redis: MakeRedis, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.redisd")
    _make_state_dir(state_dir)
    sock = socket_path(state_dir)
    # A bound-then-closed socket leaves the file behind with nobody listening, as after a crash.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    assert stat.S_ISSOCK(_mode(sock))
    # The pidfile names a live process that is not redis-server (a reused pid).
    (state_dir / "redis.pid").write_text(f"{os.getpid()}\n")

    server = make_redis()
    url = await server.start(timeout=5)
    assert not server.adopted
    assert server.pid not in (None, os.getpid())
    assert any("stale" in r.getMessage() for r in caplog.records)
    async with _client(url) as client:
        assert await client.ping() is True


async def test_stale_pidfile_of_dead_process_is_ignored(
    make_redis: MakeRedis, state_dir: Path
) -> None:
    _make_state_dir(state_dir)
    (state_dir / "redis.pid").write_text(f"{_dead_pid()}\n")

    server = make_redis()
    await server.start(timeout=5)
    assert not server.adopted and server.pid is not None


async def test_missing_binary_raises_with_install_hint(
    make_redis: MakeRedis, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RedisServerMissing, match="apt-get install redis-server") as info:
        await make_redis(binary="jitgate-no-such-redis-server").start()
    assert "brew install redis" in str(info.value)
    assert "redis.url" in str(info.value)

    empty = state_dir.parent / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RedisServerMissing) as info:
        await make_redis().start()
    assert str(info.value) == (
        "redis-server not found on PATH: install it (Debian/Ubuntu: apt-get install "
        "redis-server; macOS: brew install redis) or set redis.url in the config"
    )
    assert isinstance(info.value, RuntimeError)


async def test_too_long_socket_path_is_a_clear_error(state_dir: Path) -> None:
    deep = state_dir / ("x" * (MAX_SOCKET_PATH - len(str(state_dir))))
    server = EmbeddedRedis(deep)
    with pytest.raises(ValueError, match=f"{MAX_SOCKET_PATH}-byte limit") as info:
        await server.start()
    assert str(socket_path(deep)) in str(info.value)
    assert not deep.exists()


async def test_child_exiting_early_raises_with_log_tail(
    make_redis: MakeRedis, state_dir: Path
) -> None:
    _make_state_dir(state_dir)
    # A file where redis wants its AOF directory makes it exit right after startup.
    (state_dir / "appendonlydir").write_text("not a directory")

    server = make_redis()
    with pytest.raises(RuntimeError, match="exited with code 1") as info:
        await server.start(timeout=5)
    assert "append-only dir" in str(info.value)
    assert server.pid is None
    assert _server_pids(state_dir) == []


def _swap(a: Path, b: Path) -> None:
    a.rename(b)


def _write(path: Path, text: str) -> None:
    path.write_text(text)


async def test_supervisor_keeps_retrying_a_failing_restart(
    make_redis: MakeRedis, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.redisd")
    server = make_redis()
    url = await server.start()
    async with _client(url) as client:
        await client.set("grant:carol", "replay-9")
    old = server.pid
    assert old is not None

    # Hide the AOF directory behind a file so that restarts fail until it is put back.
    aof, hidden = state_dir / "appendonlydir", state_dir / "aof-hidden"
    _swap(aof, hidden)
    _write(aof, "not a directory")
    os.kill(old, signal.SIGKILL)
    await _wait_for(
        lambda: sum("restarting redis-server failed" in r.getMessage() for r in caplog.records) >= 2
    )
    assert server.pid is None

    aof.unlink()
    _swap(hidden, aof)
    await _wait_for(lambda: server.pid is not None)
    async with _client(url) as client:
        assert await client.get("grant:carol") == "replay-9"


async def test_socket_path_at_the_limit_works(state_dir: Path) -> None:
    room = MAX_SOCKET_PATH - len(str(state_dir)) - len("/") - len("/redis.sock")
    deep = state_dir / ("y" * room)
    assert len(os.fsencode(socket_path(deep))) == MAX_SOCKET_PATH
    server = EmbeddedRedis(deep)
    try:
        async with _client(await server.start()) as client:
            assert await client.ping() is True
    finally:
        await server.stop()
