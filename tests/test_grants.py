"""The grant store against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.grants import RedisGrants


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisGrants]:
    client = Redis.from_url(redis_url)
    yield RedisGrants(client, "jit:")
    await client.aclose()


async def test_add_check_revoke(store: RedisGrants) -> None:
    g = await store.add("alice", "recording:1/demo-1", 60, "ticket 42", "admin")
    assert g.id.startswith("g-") and g.expires_at - g.created_at == pytest.approx(60, abs=0.01)
    assert await store.check("alice", ("recording:1/demo-1",)) == (g.id, g.expires_at)
    assert await store.check("bob", ("recording:1/demo-1",)) is None
    assert await store.get(g.id) == g
    assert await store.revoke(g.id) == g
    assert await store.check("alice", ("recording:1/demo-1",)) is None
    assert await store.revoke(g.id) is None
    assert await store.get(g.id) is None


async def test_wider_scope_found_in_one_check(store: RedisGrants) -> None:
    g = await store.add("alice", "project:1", 60, "r", "admin")
    assert await store.check("alice", ("recording:1/demo-1", "project:1")) == (g.id, g.expires_at)


async def test_two_grants_same_scope_revoking_one_keeps_the_other(store: RedisGrants) -> None:
    short = await store.add("alice", "project:1", 60, "r", "admin")
    long = await store.add("alice", "project:1", 120, "r", "admin")
    await store.revoke(long.id)
    assert await store.check("alice", ("project:1",)) == (short.id, short.expires_at)
    await store.revoke(short.id)
    assert await store.check("alice", ("project:1",)) is None


async def test_expiry_is_redis_ttl(store: RedisGrants) -> None:
    g = await store.add("alice", "project:1", 0.3, "r", "admin")
    active_key = store._active_key("alice", "project:1")
    assert 0 < await store.redis.pttl(f"jit:grant:{g.id}") <= 300
    assert 0 < await store.redis.pttl(active_key) <= 300
    await asyncio.sleep(0.45)
    assert await store.check("alice", ("project:1",)) is None
    assert await store.redis.exists(f"jit:grant:{g.id}", active_key) == 0
    assert await store.list() == []
    assert await store.count_active() == 0


async def test_user_and_scope_cannot_collide(store: RedisGrants) -> None:
    await store.add("a:b", "c", 60, "r", "admin")
    assert await store.check("a", ("b:c",)) is None
    assert await store.check("a:b", ("c",)) is not None


async def test_list_and_count(store: RedisGrants) -> None:
    a = await store.add("alice", "project:1", 60, "r", "admin")
    b = await store.add("bob", "recording:1/demo-2", 30, "r", "admin")
    assert [g.id for g in await store.list()] == [b.id, a.id]
    assert [g.id for g in await store.list("alice")] == [a.id]
    assert await store.count_active() == 2


async def test_check_is_one_round_trip(store: RedisGrants, monkeypatch: Any) -> None:
    """Count what goes over the wire: direct commands and pipeline executions."""
    trips: list[str] = []
    original_execute = store.redis.execute_command
    original_pipeline = store.redis.pipeline

    async def counted_command(*args: Any, **kw: Any) -> Any:
        trips.append(str(args[0]))
        return await original_execute(*args, **kw)

    def counted_pipeline(*args: Any, **kw: Any) -> Any:
        pipe = original_pipeline(*args, **kw)
        run = pipe.execute

        async def execute(*a: Any, **k: Any) -> Any:
            trips.append(f"pipeline[{len(pipe.command_stack)}]")
            return await run(*a, **k)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(store.redis, "execute_command", counted_command)
    monkeypatch.setattr(store.redis, "pipeline", counted_pipeline)
    await store.check("alice", ("recording:1/demo-1", "project:1", "org:1"))  # loads the script
    trips.clear()
    await store.check("alice", ("recording:1/demo-1", "project:1", "org:1"))
    assert trips == ["EVALSHA"]


async def test_concurrent_adds_and_revokes_stay_consistent(store: RedisGrants) -> None:
    grants = await asyncio.gather(
        *(store.add("alice", "project:1", 60, "r", "x") for _ in range(50))
    )
    await asyncio.gather(*(store.revoke(g.id) for g in grants[:49]))
    assert await store.check("alice", ("project:1",)) == (grants[49].id, grants[49].expires_at)
    assert await store.count_active() == 1


async def test_check_returns_the_longest_lived_grant_of_a_scope(store: RedisGrants) -> None:
    await store.add("alice", "project:1", 30, "r", "admin")
    long = await store.add("alice", "project:1", 90, "r", "admin")
    await store.add("alice", "project:1", 60, "r", "admin")
    assert await store.check("alice", ("project:1",)) == (long.id, long.expires_at)
