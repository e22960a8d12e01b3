"""A fault-injecting upstream: a raw TCP server that misbehaves as each request asks, by its
query (`?fault=NAME`). Used by tests/test_faults.py and harden/check_faults.py.

"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp.test_utils import TestServer
from proxykit import counting_logs, running

# fault -> what the client should get: the status, or 0 when the response has begun and
# can only be cut (a truncated body must not look complete).
FAULTS: dict[str, int] = {
    "refused": 502,  # nothing listens (served by a jitgate whose upstream port is closed)
    "reset-before-headers": 502,
    "reset-mid-body": 0,
    "slow-first-byte": 504,  # past jitgate's read_timeout
    "stalled-body": 0,
    "5xx": 503,  # the upstream's own answer, relayed
    "invalid-headers": 502,
    "refused-upgrade": 403,  # a WebSocket upgrade answered 403: relayed as plain HTTP
}
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultyUpstream:
    """The server; `slow` is how long the slow first byte takes (over jitgate's read_timeout)."""

    def __init__(self, slow: float) -> None:
        self.slow = slow
        self.served = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.served += 1
                target = head.split(b" ", 2)[1].decode()
                fault = parse_qs(urlsplit(target).query).get("fault", [""])[0]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if not await self._answer(fault, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.transport.abort()

    async def _answer(
        self, fault: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request as `fault` says; whether the connection may be used again."""
        if fault == "reset-before-headers":
            _reset(writer)
            return False
        if fault == "reset-mid-body":
            writer.write(HEAD_OK + b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.01)
            _reset(writer)
            return False
        if fault == "slow-first-byte":
            await asyncio.sleep(self.slow)
        elif fault == "stalled-body":
            writer.write(HEAD_OK + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
            await writer.drain()
            await reader.read()  # until jitgate gives up and closes
            return False
        elif fault == "5xx":
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n")
            await writer.drain()
            return True
        elif fault == "invalid-headers":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Broken\x01Name: y\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return False
        elif fault == "refused-upgrade":
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope\n")
            await writer.drain()
            return True
        writer.write(HEAD_OK + b"Content-Length: 3\r\n\r\nok\n")
        await writer.drain()
        return True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FaultyUpstream]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


@dataclass
class Tally:
    """What the client got, per fault: statuses (0: cut), and the bad answers seen."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)  # the first few
    count_wrong: int = 0

    def add(self, fault: str, status: int, problem: str | None) -> None:
        self.statuses.setdefault(fault, Counter())[status] += 1
        if status != FAULTS[fault]:
            problem = problem or f"status {status}, not {FAULTS[fault]}"
        if problem:
            self.count_wrong += 1
            if len(self.wrong) < 20:
                self.wrong.append(f"{fault}: {problem}")


FAILURE_TYPES = {"application/json", "text/html"}


async def ask(session: aiohttp.ClientSession, base: str, fault: str, n: int, tally: Tally) -> None:
    """One faulted request (JSON asked for on even n, a page on odd n); count its answer."""
    url = f"{base}/static/f?fault={fault}&n={n}"
    accept = "text/html" if n % 2 else "application/json"
    problem = None
    try:
        if fault == "refused-upgrade":
            try:
                async with session.ws_connect(url):
                    status = 101
            except aiohttp.WSServerHandshakeError as exc:
                status = exc.status
        else:
            async with session.get(url, headers={"Accept": accept}) as r:
                status = r.status
                body = await r.read()
                if status in (502, 504):
                    kind = r.content_type
                    if kind != accept or not body:
                        problem = f"{status} answered {kind} ({len(body)} bytes) to {accept}"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        status = 0
    except aiohttp.ClientError as exc:
        status, problem = -1, repr(exc)
    tally.add(fault, status, problem)


async def hammer(bases: dict[str, str], total: int, concurrency: int) -> Tally:
    """Send `total` requests, the faults in turn, `concurrency` at a time; `bases` maps each
    fault to the jitgate that serves it."""
    tally, faults = Tally(), sorted(FAULTS)
    queue = iter(range(total))

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in queue:
            fault = faults[n % len(faults)]
            await ask(session, bases[fault], fault, n, tally)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return tally


_UPSTREAM_ERRORS = {f"upstream error: {kind}" for kind in ("connect", "timeout", "protocol")}
FAILING = frozenset(f for f in FAULTS if f not in ("5xx", "refused-upgrade"))


@dataclass
class Figures:
    requests: int
    tally: Tally
    leaked_fds: int  # open fds after the run and its settling, less those before
    redis_pool_growth: int  # connections to Redis opened meanwhile (bounded by its pool)
    failures_audited: int  # audit records that name an upstream error
    failures_sent: int  # requests whose fault is an upstream failure
    warnings: int  # WARNING lines from jitgate.upstream
    errors: list[str]  # the first lines of every ERROR (or worse) record logged

    def problems(self) -> list[str]:
        out = list(self.tally.wrong)
        if self.leaked_fds > 0:
            out.append(f"{self.leaked_fds} file descriptors leaked")
        if self.failures_audited != self.failures_sent:
            out.append(f"{self.failures_audited} audit records of {self.failures_sent} failures")
        if self.warnings != self.failures_sent:
            out.append(f"{self.warnings} warning lines for {self.failures_sent} failures")
        out += self.errors[:5]
        return out


async def run_faults(redis_url: str, total: int, concurrency: int) -> Figures:
    """Two jitgates (one in front of the faulty upstream, one in front of a closed port),
    `total` faulted requests through them after a warm-up, then the figures."""
    upstream_log = counting_logs(lambda record: record.name == "jitgate.upstream")
    with tempfile.TemporaryDirectory(prefix="jitgate-faults-") as tmp, upstream_log as caught:
        dirs = [Path(tmp, "faulty"), Path(tmp, "dead")]
        for d in dirs:
            d.mkdir()
        async with contextlib.AsyncExitStack() as stack:
            up = await stack.enter_async_context(FaultyUpstream(slow=2.0).running())
            faulty, _, _ = await stack.enter_async_context(
                running(up.url, redis_url, read_timeout=1.0, tmp=dirs[0])
            )
            dead, _, _ = await stack.enter_async_context(
                running(closed_port_url(), redis_url, tmp=dirs[1])
            )
            bases = {f: _base(dead if f == "refused" else faulty) for f in FAULTS}
            warm = len(FAULTS) * concurrency
            await hammer(bases, warm, concurrency)
            await asyncio.sleep(1.0)
            redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
            before, pooled = open_fds(redis_port)
            tally = await hammer(bases, total, concurrency)
            # Cut connections close on the upstream's side as it notices: a leak is
            # what is still open after that.
            for _ in range(50):
                after, pooled_after = open_fds(redis_port)
                if after <= before:
                    break
                await asyncio.sleep(0.1)
        audited = sum(
            1
            for d in dirs
            for line in (d / "audit.jsonl").read_text().splitlines()
            if _UPSTREAM_ERRORS & set(json.loads(line).get("reasons", ()))
        )
    sent = sum(sum(c.values()) for f, c in tally.statuses.items() if f in FAILING)
    warm_failing = sum(1 for n in range(warm) if sorted(FAULTS)[n % len(FAULTS)] in FAILING)
    return Figures(
        requests=total,
        tally=tally,
        leaked_fds=after - before,
        redis_pool_growth=pooled_after - pooled,
        failures_audited=audited - warm_failing,
        failures_sent=sent,
        warnings=caught.matched - warm_failing,
        errors=caught.errors,
    )


def _base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def closed_port_url() -> str:
    """The URL of a local port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _remote_ports() -> dict[str, int]:
    """The remote port of every TCP socket on this host, by socket inode."""
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                ports[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return ports


def open_fds(pooled_port: int) -> tuple[int, int]:
    """This process's open file descriptors: those that are not TCP connections to
    `pooled_port`, and those that are (Redis's, a pool that grows with concurrency up to
    redis.max_connections)."""
    ports = _remote_ports()
    other = pooled = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own fd)
        if target.startswith("socket:[") and ports.get(target[8:-1]) == pooled_port:
            pooled += 1
        else:
            other += 1
    return other, pooled
