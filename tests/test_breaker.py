"""The breaker in front of the grant check: a stopped or dead Redis costs a quick 503 and
never a request let through without a grant; access is back soon after Redis answers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
from aiohttp import ClientSession
from breakerkit import Load, exercise
from conftest import RedisServer, Upstream, bearer
from proxykit import SCOPE, SNAPSHOTS, percentile, running
from redis.asyncio import Redis
from waiting import eventually

from proxy.breaker import Breaker, BreakerOpen
from proxy.grantstore import RedisGrants


@pytest.fixture
def kept_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own that keeps its grants when killed."""
    server = RedisServer(persist=True)
    server.start()
    yield server
    server.close()


async def test_a_frozen_redis_opens_the_breaker_and_a_probe_closes_it(
    own_redis: RedisServer,
) -> None:
    client = Redis.from_url(own_redis.url, socket_timeout=5.0, socket_connect_timeout=5.0)
    store = RedisGrants(client)
    changes: list[bool] = []
    breaker = Breaker(store, client.ping, probe_timeout=5.0, on_change=changes.append)
    watch = asyncio.create_task(breaker.run())
    assert own_redis.proc is not None
    try:
        await store.add("alice", SCOPE, 60, "r", "admin")
        assert await breaker.check("alice", (SCOPE,)) is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BreakerOpen):
                await breaker.check("alice", (SCOPE,))
            # Found by the stall, long before the 5 s socket timeout would have said so.
            assert time.monotonic() - started < 2.5
            assert breaker.is_open and changes == [True]
            with pytest.raises(BreakerOpen):  # at once now, without asking Redis
                await breaker.check_many("alice", [(SCOPE,)])
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        await eventually(lambda: not breaker.is_open, what="the probe to close the breaker")
        assert changes == [True, False] and breaker.trips == 1
        assert await breaker.check("alice", (SCOPE,)) is not None
    finally:
        watch.cancel()
        await client.aclose()


async def test_a_pool_that_is_merely_full_opens_nothing(own_redis: RedisServer) -> None:
    client = Redis.from_url(own_redis.url, max_connections=1)
    store = RedisGrants(client)
    breaker = Breaker(store, client.ping)
    try:
        results = await asyncio.gather(
            *(breaker.check("alice", (SCOPE,)) for _ in range(20)), return_exceptions=True
        )
        assert any(isinstance(r, Exception) for r in results)  # the pool refused some
        assert not breaker.is_open
    finally:
        await client.aclose()


async def test_through_jitgate_503_then_back_and_the_metric_says_so(
    own_redis: RedisServer, upstream: Upstream
) -> None:
    async with running(upstream.url, own_redis.url) as (server, state, _), ClientSession() as http:
        await state.grants.add("alice", SCOPE, 60, "r", "admin")
        assert own_redis.proc is not None

        async def answers(status: int) -> bool:
            async with http.get(server.make_url(SNAPSHOTS), headers=bearer()) as r:
                return r.status == status

        async def breaker_open() -> list[str]:
            async with http.get(server.make_url("/_jit/metrics")) as r:
                text = await r.text()
            return [x for x in text.splitlines() if x.startswith("jitgate_redis_breaker_")]

        assert await answers(200)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: answers(503), what="a 503")
            opened = await breaker_open()
            assert "jitgate_redis_breaker_open 1.0" in opened
            assert "jitgate_redis_breaker_trips_total 1.0" in opened
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        await eventually(lambda: answers(200), what="access back")
        assert "jitgate_redis_breaker_open 0.0" in await breaker_open()


@pytest.mark.parametrize("plan", [["stop"], ["kill"]])
async def test_under_load_quick_503s_never_a_200_without_a_grant(
    kept_redis: RedisServer, upstream: Upstream, plan: list[str]
) -> None:
    async with running(upstream.url, kept_redis.url) as (server, state, _):
        await state.grants.add("alice", SCOPE, 3600, "r", "admin")
        load = Load(str(server.make_url("")).rstrip("/"), 8, state.breaker)
        await exercise(load, kept_redis, plan, hold=0.6, settle=0.4)
    (outage,) = load.outages
    assert load.ungranted_200() == 0
    assert load.unexpected() == {}
    assert load.refused_during(outage) > 0
    waits = load.during(outage)
    # Below redis.timeout (0.5 s here), which every request waited for without the breaker.
    assert percentile(waits, 99) < 0.5, sorted(waits)[-5:]
    back = load.back_after(outage)
    assert back is not None and back < 1.0
