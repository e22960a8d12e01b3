"""How jitgate reaches Redis: a fail-fast client (of one server, of the master that Sentinel
names, or of the master of jitgate's slot in a cluster: see redisha.py), a probe of a
subscription's connection, and the embedded redis-server child it runs and supervises on a
unix socket in its state dir when no Redis is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redisha import SentinelRedis, SlotPool
from .settings import RedisSettings
from .settings.read import Secret

# sun_path is 108 bytes on Linux (104 on the BSDs/macOS), including the trailing NUL.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107

_INSTALL_HINT = (
    "redis-server not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server; "
    "macOS: brew install redis) or set redis.url in the config"
)
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
# A child that stayed up this long counts as healthy, so the next crash restarts quickly again.
_STABLE_AFTER = 30.0
_STOP_GRACE = 10.0
_LOG_TAIL_LINES = 20


class RedisServerMissing(RuntimeError):
    def __init__(self, binary: str = "redis-server") -> None:
        extra = "" if binary == "redis-server" else f" (looked for {binary!r})"
        super().__init__(_INSTALL_HINT + extra)


def socket_path(state_dir: Path) -> Path:
    """Return the path of the embedded server's unix socket."""
    return state_dir / "redis.sock"


def redis_url(state_dir: Path) -> str:
    """Return the redis-py URL of the embedded server's unix socket."""
    return "unix://" + quote(str(socket_path(state_dir.absolute())))


async def _ping(path: Path, within: float = 1.0) -> str | None:
    """Send PING on a unix socket; return the reply line, or None if nothing answers."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    # An empty line means the peer closed without answering.
    return line.decode("utf-8", "replace").strip() or None


def _live_redis_pid(pidfile: Path, binary: str) -> int | None:
    """Return the pid in pidfile if it names a live redis-server process."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    if sys.platform.startswith("linux"):
        # Check the name too: after a reboot or a long crash the pid may belong to anything.
        # comm is the executable's name cut to 15 bytes; redis rewrites only its argv.
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm in {"redis-server", Path(binary).name[:15]} else None
    # Elsewhere only liveness can be checked cheaply; a reused pid then yields a clear error
    # instead of a second server writing the same AOF.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _log_tail(logfile: Path, offset: int = 0) -> str:
    try:
        with logfile.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        data = b""
    lines = data.decode("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else f"({logfile} has nothing new)"


class EmbeddedRedis:
    """A redis-server child on a unix socket in state_dir, restarted if it dies."""

    def __init__(
        self,
        state_dir: Path,
        *,
        binary: str = "redis-server",
        log: logging.Logger | None = None,
    ) -> None:
        self._dir = Path(state_dir).absolute()
        self._sock = socket_path(self._dir)
        self._logfile = self._dir / "redis.log"
        self._pidfile = self._dir / "redis.pid"
        self._binary = binary
        self._log = log or logging.getLogger(__name__)
        self._proc: asyncio.subprocess.Process | None = None
        self._adopted_pid: int | None = None
        self._adopted = False
        self._running = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return redis_url(self._dir)

    @property
    def pid(self) -> int | None:
        if self._adopted:
            return self._adopted_pid
        if self._proc is not None and self._proc.returncode is None:
            return self._proc.pid
        return None

    @property
    def adopted(self) -> bool:
        return self._adopted

    async def start(self, timeout: float = 10.0) -> str:  # noqa: ASYNC109 (public API)
        """Start (or adopt) the server, wait until it answers PING and return its URL."""
        if self._running:
            raise RuntimeError(f"embedded redis-server for {self._dir} is already started")
        sock_bytes = len(os.fsencode(self._sock))
        if sock_bytes > MAX_SOCKET_PATH:
            raise ValueError(
                f"redis unix socket path {self._sock} is {sock_bytes} bytes, over the "
                f"{MAX_SOCKET_PATH}-byte limit for unix sockets: use a shorter state directory"
            )
        executable = shutil.which(self._binary)
        if executable is None:
            raise RedisServerMissing(self._binary)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)

        if await self._try_adopt(timeout):
            self._running = True
            return self.url

        await self._spawn(executable, timeout)
        self._running = True
        self._supervisor = asyncio.create_task(
            self._supervise(executable, timeout), name=f"redisd-supervisor:{self._sock}"
        )
        return self.url

    async def stop(self) -> None:
        """Stop supervising, shut the owned child down gracefully and remove its socket."""
        self._running = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._adopted:
            # Not ours: another jitgate (or an earlier run) owns it, so leave it serving.
            self._log.info("leaving adopted redis-server pid %s running", self._adopted_pid)
            self._adopted = False
            self._adopted_pid = None
            return
        proc, self._proc = self._proc, None
        if proc is None:
            return
        await self._terminate(proc)
        # A clean shutdown removes these itself; after SIGKILL they are left behind.
        self._sock.unlink(missing_ok=True)
        if _live_redis_pid(self._pidfile, self._binary) is None:
            self._pidfile.unlink(missing_ok=True)
        self._log.info("stopped redis-server pid %d (exit %s)", proc.pid, proc.returncode)

    async def _try_adopt(self, within: float) -> bool:
        reply = await _ping(self._sock)
        live_pid = _live_redis_pid(self._pidfile, self._binary)
        if reply is None and live_pid is None:
            if self._sock.exists() or self._sock.is_symlink():
                self._log.warning("removing stale redis socket %s", self._sock)
                self._sock.unlink(missing_ok=True)
            return False
        # Wait out AOF loading (-LOADING) or a server that is still starting up.
        if not await self._wait_pong(within):
            if reply is not None:
                raise RuntimeError(f"something on {self._sock} answers PING with {reply!r}")
            raise RuntimeError(
                f"redis-server pid {live_pid} (from {self._pidfile}) is alive but does not answer "
                f"PING on {self._sock}; stop it, or remove {self._pidfile} if that pid is not "
                "jitgate's redis-server"
            )
        self._adopted = True
        self._adopted_pid = live_pid
        self._log.warning(
            "adopted the redis-server already answering on %s (pid %s), left over from an "
            "earlier run or owned by another process; it will not be supervised or stopped",
            self._sock,
            live_pid,
        )
        return True

    async def _wait_pong(
        self, within: float, proc: asyncio.subprocess.Process | None = None
    ) -> bool:
        deadline = time.monotonic() + within
        while True:
            if proc is not None and proc.returncode is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if await _ping(self._sock, min(1.0, remaining)) == "+PONG":
                return True
            await asyncio.sleep(0.02)

    def _args(self) -> list[str]:
        return [
            "--port", "0",
            "--unixsocket", str(self._sock),
            "--unixsocketperm", "700",
            "--dir", str(self._dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--supervised", "no",
            "--logfile", str(self._logfile),
            "--pidfile", str(self._pidfile),
            "--notify-keyspace-events", "Ex",
        ]  # fmt: skip

    async def _spawn(self, executable: str, within: float) -> None:
        # Stale after a crash of the child; redis would unlink it too, but be explicit.
        self._sock.unlink(missing_ok=True)
        offset = self._logfile.stat().st_size if self._logfile.exists() else 0
        # Errors in the arguments go to stderr before the logfile is opened: keep them in the log.
        with self._logfile.open("ab") as errlog:
            proc = await asyncio.create_subprocess_exec(
                executable,
                *self._args(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=errlog,
                # Its own session: a Ctrl-C in the terminal reaches jitgate only, which stops
                # it last, once nothing writes to it any more.
                start_new_session=True,
            )
        try:
            ready = await self._wait_pong(within, proc)
        except BaseException:
            await self._kill(proc)
            raise
        if ready:
            # Published only once serving, so a non-None pid means the socket answers.
            self._proc = proc
            self._log.info("started redis-server pid %d on %s", proc.pid, self._sock)
            return
        if proc.returncode is None:
            await self._kill(proc)
            what = f"did not answer PING on {self._sock} within {within:g}s"
        else:
            what = f"exited with code {proc.returncode}"
        raise RuntimeError(
            f"redis-server {what}; tail of {self._logfile}:\n{_log_tail(self._logfile, offset)}"
        )

    async def _supervise(self, executable: str, within: float) -> None:
        backoff = _BACKOFF_MIN
        started = time.monotonic()
        while self._running:
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                if not self._running:
                    return
                if time.monotonic() - started >= _STABLE_AFTER:
                    backoff = _BACKOFF_MIN
                self._log.error(
                    "redis-server pid %d exited unexpectedly (code %d); restarting in %.1fs",
                    proc.pid,
                    code,
                    backoff,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            started = time.monotonic()
            try:
                await self._spawn(executable, within)
            except Exception:
                # Keep supervising: the next attempt, after a longer backoff, may succeed.
                self._log.exception("restarting redis-server failed")
                self._proc = None

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE)
        except TimeoutError:
            self._log.warning(
                "redis-server pid %d ignored SIGTERM for %gs; killing it", proc.pid, _STOP_GRACE
            )
            await self._kill(proc)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        # Shielded so a cancelled caller still reaps the child instead of leaving a zombie.
        await asyncio.shield(proc.wait())


def connect_redis(
    settings: RedisSettings, embedded_url: str | None = None, *, timeout: float | None = None
) -> Redis:
    """Return the client the settings name (redis.url, redis.sentinel, else the embedded
    server at `embedded_url`), failing fast, so a dead Redis means a quick 503, not a hang.

    A plain pool: redis-py's blocking pool, which queues callers past the limit, cost
    about 7% of jitgate's throughput in `make bench`. Past max_connections concurrent
    Redis calls a request fails closed (503) instead of waiting.

    Through Sentinel, every new connection asks the sentinels for the master first; while
    they name none (a failover under way) a call fails as if Redis were down.
    """
    within = settings.timeout if timeout is None else timeout
    common: dict[str, Any] = {
        "max_connections": settings.max_connections,
        "socket_timeout": within,
        "socket_connect_timeout": within,
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    s, c = settings.sentinel, settings.cluster
    if c is not None:
        access = _access(c.tls, c.tls_ca_file, c.username, c.password)
        # One try per node: the next node is the retry, as with the sentinels.
        asking = {"socket_timeout": within, "socket_connect_timeout": within, **access}
        asking["retry"] = Retry(NoBackoff(), 0)
        pool = SlotPool(c.nodes, settings.key_prefix, asking, **common, **access)
        return Redis(connection_pool=pool)
    if s is not None:
        tls = _access(s.tls, s.tls_ca_file)
        sentinel = Sentinel(
            s.sentinels,
            sentinel_kwargs={
                "socket_timeout": within,
                "socket_connect_timeout": within,
                "username": s.sentinel_username,
                "password": s.sentinel_password.reveal() if s.sentinel_password else None,
                **tls,
            },
        )
        client: SentinelRedis = sentinel.master_for(
            s.master,
            redis_class=SentinelRedis,
            **common,
            **_access(s.tls, s.tls_ca_file, s.username, s.password),
            db=s.db,
        )
        client.sentinels = sentinel
        return client
    url = settings.url or embedded_url
    if url is None:
        raise ValueError("no Redis to connect to: neither redis.url nor redis.sentinel is set")
    return Redis(connection_pool=ConnectionPool.from_url(url, **common))


def _access(
    tls: bool, ca_file: Path | None, username: str | None = None, password: Secret | None = None
) -> dict[str, Any]:
    """Return redis-py's connection arguments for TLS and, if given, AUTH."""
    out: dict[str, Any] = {"ssl": True} if tls else {}
    if tls and ca_file is not None:
        out["ssl_ca_certs"] = str(ca_file)
    if username or password:
        out |= {"username": username, "password": password.reveal() if password else None}
    return out


def quiet_probe(pubsub: PubSub) -> tuple[socket.socket | None, Callable[[], bool]]:
    """A probe of a subscription's connection: True while nothing is left unread.

    It looks at redis-py's stream reader (bytes read but not parsed yet) and peeks at the
    socket itself (bytes, or the end of the stream, not read yet). If redis-py's internals
    are not what it expects, it always says False: the caller then trusts nothing.
    """
    conn = pubsub.connection
    reader = getattr(conn, "_reader", None)
    writer = getattr(conn, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or writer is None:
        return None, lambda: False
    try:
        fd = writer.transport.get_extra_info("socket").fileno()
        peek = socket.socket(fileno=os.dup(fd))
    except (AttributeError, OSError):
        return None, lambda: False
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT

    def quiet() -> bool:
        buffered: object = getattr(reader, "_buffer", None)  # read, not parsed yet
        if reader.at_eof() or buffered is None or buffered:
            return False
        try:
            peek.recv(1, flags)
        except BlockingIOError:
            return True  # nothing pending, and the connection is open
        except OSError:
            return False
        return False  # a byte, or the end of the stream, waits to be read

    return peek, quiet
