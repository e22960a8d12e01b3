"""Cutting live connections when their grant ends: revoked, expired, or unverifiable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from conftest import RedisServer
from redis.asyncio import Redis
from waiting import eventually

from proxy.grantstore import RedisGrants
from proxy.live import LiveConnections, follow_revocations


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisGrants]:
    client = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    yield RedisGrants(client)
    await client.aclose()


async def subscribed(store: RedisGrants) -> None:
    """Wait until the revocation feed listens on the grants' channel."""

    async def listening() -> bool:
        ((_, count),) = await store.redis.pubsub_numsub(store.channel)
        return bool(count)

    await eventually(listening, what="the revocation feed to subscribe")


async def wait_set(event: asyncio.Event, limit: float) -> float:
    started = time.monotonic()
    await asyncio.wait_for(event.wait(), limit)
    return time.monotonic() - started


async def test_revoke_anywhere_cuts_within_100ms(store: RedisGrants, redis_url: str) -> None:
    cuts: list[tuple[str, int]] = []
    live = LiveConnections(store.expires_at, on_cut=lambda r, n: cuts.append((r, n)))
    follower = asyncio.create_task(follow_revocations(store.revocations, live))
    try:
        grant = await store.add("alice", "recording:1/demo-1", 60, "r", "t")
        other = await store.add("alice", "recording:1/demo-2", 60, "r", "t")
        a, b = live.open(grant.id, grant.expires_at), live.open(grant.id, grant.expires_at)
        c = live.open(other.id, other.expires_at)
        await subscribed(store)
        # Another replica revokes, through its own connection.
        replica = Redis.from_url(redis_url)
        await RedisGrants(replica).revoke(grant.id)
        took = await wait_set(a, 1.0)
        assert b.is_set() and not c.is_set()
        assert took < 0.1
        assert cuts == [("revoked", 2)]
        assert len(live) == 1
        await replica.aclose()
    finally:
        follower.cancel()
        await live.close_all()


async def test_expiry_cuts_at_the_grant_end(store: RedisGrants) -> None:
    cuts: list[str] = []
    live = LiveConnections(store.expires_at, on_cut=lambda r, n: cuts.append(r))
    grant = await store.add("alice", "project:1", 0.4, "r", "t")
    stop = live.open(grant.id, grant.expires_at)
    took = await wait_set(stop, 2.0)
    assert 0.3 < took < 1.0
    assert cuts == ["expired"] or cuts == ["ended"]
    await live.close_all()


async def test_extended_grant_is_not_cut() -> None:
    ends = {"g-1": time.time() + 0.2}
    looked: list[str] = []

    async def lookup(grant_id: str) -> float | None:
        looked.append(grant_id)
        return ends.get(grant_id)

    live = LiveConnections(lookup)
    stop = live.open("g-1", ends["g-1"])
    ends["g-1"] = time.time() + 0.6  # extended before the first end
    # The check at the first end has run (it finds the new end); it must not have cut.
    await eventually(lambda: looked, what="the check at the first end")
    assert not stop.is_set()
    await wait_set(stop, 1.0)
    await live.close_all()


async def test_unverifiable_grant_is_cut() -> None:
    async def lookup(grant_id: str) -> float | None:
        raise ConnectionError("redis down")

    cuts: list[str] = []
    live = LiveConnections(lookup, on_cut=lambda r, n: cuts.append(r))
    stop = live.open("g-1", time.time() + 0.1)
    await wait_set(stop, 1.0)
    assert cuts == ["unverifiable"]


async def test_closed_connections_are_forgotten() -> None:
    async def lookup(grant_id: str) -> float | None:
        return time.time() + 60

    live = LiveConnections(lookup)
    stop = live.open("g-1", time.time() + 60)
    assert len(live) == 1
    live.close("g-1", stop)
    assert len(live) == 0 and live.cut("g-1", "revoked") == 0


async def test_losing_the_feed_fails_closed_and_recheck_follows(own_redis: RedisServer) -> None:
    client = Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisGrants(client)
    cuts: list[str] = []
    live = LiveConnections(store.expires_at, on_cut=lambda r, n: cuts.append(r))
    follower = asyncio.create_task(
        follow_revocations(lambda: store.revocations(ping_every=0.2), live)
    )
    try:
        grant = await store.add("alice", "project:1", 60, "r", "t")
        stop = live.open(grant.id, grant.expires_at)
        await subscribed(store)
        own_redis.kill()
        await wait_set(stop, 3.0)
        assert cuts == ["redis_unavailable"]
    finally:
        follower.cancel()
        await live.close_all()
        await client.aclose()


async def test_recheck_cuts_grants_revoked_while_unsubscribed(store: RedisGrants) -> None:
    cuts: list[str] = []
    live = LiveConnections(store.expires_at, on_cut=lambda r, n: cuts.append(r))
    kept = await store.add("alice", "project:1", 60, "r", "t")
    gone = await store.add("bob", "project:1", 60, "r", "t")
    a, b = live.open(kept.id, kept.expires_at), live.open(gone.id, gone.expires_at)
    await store.revoke(gone.id)  # nobody is listening
    await live.recheck()
    assert b.is_set() and not a.is_set()
    assert cuts == ["ended"]
    await live.close_all()
