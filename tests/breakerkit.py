"""Redis in trouble under load: how soon protected requests are answered once Redis stops
(SIGSTOP) or dies (kill -9), whether any is let through without a grant, and how soon
access comes back once Redis answers again. Used by tests/test_breaker.py and
harden/check_breaker.py."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.queues
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType

import aiohttp
from conftest import RedisServer, make_token
from proxykit import SNAPSHOTS

from proxy.breaker import Breaker


@dataclass
class Answer:
    sent: float
    done: float
    granted: bool  # asked as the user with a grant
    status: int


@dataclass
class Outage:
    how: str  # "stop" (SIGSTOP, then SIGCONT) or "kill" (kill -9, then started again)
    out: float  # when Redis stopped answering (monotonic)
    back: float  # when it answered again
    trips_before: int  # times the breaker had opened before this outage


@dataclass
class Load:
    """Clients asking for a protected recording in a loop, half as a user with a grant
    (alice) and half as one without (bob)."""

    base_url: str
    clients: int
    breaker: Breaker
    answers: list[Answer] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)

    def run_elsewhere(self) -> tuple[Callable[[], None], Callable[[], None]]:
        """Start the clients in a process of their own (so that jitgate's loop serves them
        and nothing else); return a function that waits until they are asking, and one that
        stops them and collects their answers."""
        ctx = multiprocessing.get_context("spawn")
        started, stop, answers = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(
            target=_clients, args=(self.base_url, self.clients, started, stop, answers)
        )
        proc.start()

        def ready() -> None:
            if not started.wait(60):
                raise RuntimeError("the load process did not start")

        def finish() -> None:
            stop.set()
            self.answers += [Answer(*a) for a in answers.get(timeout=60)]
            proc.join(10)

        return ready, finish

    async def outage(self, redis: RedisServer, how: str, hold: float) -> None:
        """Stop or kill Redis for `hold` seconds, then bring it back (killed, it starts
        again on its port with what it persisted)."""
        assert redis.proc is not None
        pid = redis.proc.pid
        trips = self.breaker.trips
        out = time.monotonic()
        if how == "stop":
            os.kill(pid, signal.SIGSTOP)
        else:
            redis.kill()
        await asyncio.sleep(hold)
        if how == "stop":
            os.kill(pid, signal.SIGCONT)
        else:
            await asyncio.to_thread(redis.start)  # returns once it answers PING
        self.outages.append(Outage(how, out, time.monotonic(), trips))

    # -- the figures -------------------------------------------------------------------

    def during(self, outage: Outage) -> list[float]:
        """Seconds each request waited for its answer while Redis was out (counted from the
        moment it went, for requests already waiting then)."""
        return [
            a.done - max(a.sent, outage.out)
            for a in self.answers
            if a.done > outage.out and a.sent < outage.back
        ]

    def refused_during(self, outage: Outage) -> int:
        return sum(1 for a in self.answers if outage.out < a.sent < outage.back and a.status == 503)

    def back_after(self, outage: Outage) -> float | None:
        """Seconds from Redis answering again to the first 200 of a request sent after."""
        firsts = [
            a.done for a in self.answers if a.granted and a.sent >= outage.back and a.status == 200
        ]
        return min(firsts) - outage.back if firsts else None

    def ungranted_200(self) -> int:
        return sum(1 for a in self.answers if not a.granted and a.status == 200)

    def unexpected(self) -> dict[int, int]:
        """Statuses other than 200, 403 and 503, with their counts (0: no answer)."""
        out: dict[int, int] = {}
        for a in self.answers:
            if a.status not in (200, 403, 503):
                out[a.status] = out.get(a.status, 0) + 1
        return out


def _clients(
    base_url: str,
    clients: int,
    started: EventType,
    stop: EventType,
    answers: multiprocessing.queues.Queue[list[tuple[float, float, bool, int]]],
) -> None:
    out: list[tuple[float, float, bool, int]] = []

    async def one(session: aiohttp.ClientSession, granted: bool) -> None:
        headers = {"Authorization": f"Bearer {make_token('alice' if granted else 'bob')}"}
        url = base_url + SNAPSHOTS
        while not stop.is_set():
            sent = time.monotonic()
            try:
                async with session.get(url, headers=headers) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = 0
            out.append((sent, time.monotonic(), granted, status))
            started.set()

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(one(session, n % 2 == 0) for n in range(clients)))

    asyncio.run(run())
    answers.put(out)


async def exercise(
    load: Load, redis: RedisServer, plan: list[str], *, hold: float, settle: float
) -> None:
    """Run the load (in a process of its own), and meanwhile each outage of the plan
    ("stop" or "kill") in turn, each for `hold` seconds, with `settle` seconds of a healthy
    Redis before, between and after."""
    ready, finish = load.run_elsewhere()
    try:
        await asyncio.to_thread(ready)
        await asyncio.sleep(settle)
        for how in plan:
            await load.outage(redis, how, hold)
            await asyncio.sleep(settle)
    finally:
        await asyncio.to_thread(finish)
