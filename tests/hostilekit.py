"""Hostile clients: raw exchanges that break the rules, slowloris connections that trickle
their headers a byte at a time, and a well-behaved client timing its answers meanwhile.
Used by tests/test_hostile.py and harden/check_hostile.py."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time

import aiohttp


async def exchange(host: str, port: int, data: bytes, *, within: float = 5.0) -> bytes:
    """Send `data` on a new connection; return everything read until the server closes it
    (or `within` seconds pass)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(within):
                while chunk := await reader.read(65536):
                    out += chunk
        return out
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0: none)."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def trickle(host: str, port: int, conns: int, every: float, seconds: float) -> int:
    """Open `conns` connections that send a request's headers one byte every `every`
    seconds, for `seconds`; return how many the server closed meanwhile."""
    closed = 0
    deadline = time.monotonic() + seconds

    async def one(n: int) -> None:
        nonlocal closed
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            closed += 1
            return
        head = f"GET /static/slow{n} HTTP/1.1\r\nHost: x\r\n".encode()
        filler = b"X-Slow: " + b"a" * 10_000
        try:
            for byte in head + filler:
                if time.monotonic() > deadline:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(every)
        except ConnectionError:
            closed += 1
        finally:
            writer.close()

    await asyncio.gather(*(one(n) for n in range(conns)))
    return closed


def _trickle_main(host: str, port: int, conns: int, every: float, seconds: float) -> None:
    asyncio.run(trickle(host, port, conns, every, seconds))


def trickle_elsewhere(
    host: str, port: int, conns: int, every: float, seconds: float
) -> multiprocessing.process.BaseProcess:
    """`trickle` in a process of its own, so the slow clients cost jitgate's loop only what
    their bytes cost it."""
    proc = multiprocessing.get_context("spawn").Process(
        target=_trickle_main, args=(host, port, conns, every, seconds), daemon=True
    )
    proc.start()
    return proc


async def timed_gets(url: str, seconds: float, headers: dict[str, str]) -> list[tuple[float, int]]:
    """A well-behaved client: one GET after another for `seconds`; (seconds, status) each."""
    out = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            started = time.monotonic()
            async with session.get(url, headers=headers) as r:
                await r.read()
                out.append((time.monotonic() - started, r.status))
            await asyncio.sleep(0.005)
    return out
