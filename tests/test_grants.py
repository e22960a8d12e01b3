"""The grant store and its lifecycle against a real Redis, races included."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from waiting import eventually

from proxy.grants import Grant, GrantError
from proxy.grantstore import RedisGrants
from proxy.redisd import connect_redis
from proxy.settings import RedisSettings


async def _gone(redis: Redis, key: str) -> bool:
    """Whether Redis has dropped `key` (its TTL has run out)."""
    return not await redis.exists(key)


async def _in_state(store: RedisGrants, grant_id: str, state: str) -> Grant | None:
    """The grant once it reads as `state` (expired and lapsed are derived from the clock)."""
    grant = await store.get(grant_id)
    return grant if grant is not None and grant.state == state else None


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisGrants]:
    client = Redis.from_url(redis_url)
    yield RedisGrants(client, "jit:")
    await client.aclose()


@pytest.fixture
async def replica(redis_url: str) -> AsyncIterator[RedisGrants]:
    """The same store through a client of its own, as another replica would use it."""
    client = Redis.from_url(redis_url)
    yield RedisGrants(client, "jit:")
    await client.aclose()


async def request(store: RedisGrants, needed: int = 1, **kw: Any) -> Grant:
    args: dict[str, Any] = {
        "duration": 60, "reason": "INC-1", "ticket": "T-1", "entitlement": "oncall",
        "needed": needed, "pending_ttl": 60,
    }  # fmt: skip
    args.update(kw)
    user, scope = args.pop("user", "alice"), args.pop("scope", "project:1")
    return await store.request(user, scope, **args)


async def refused(code: str, call: Any) -> str:
    with pytest.raises(GrantError) as info:
        await call
    assert info.value.code == code
    return str(info.value)


async def active_ids(store: RedisGrants, user: str = "alice", scope: str = "project:1") -> set[str]:
    members = await store.redis.zrange(store._active_key(user, scope), 0, -1)
    return {m.decode() for m in members if isinstance(m, bytes)}


# --- admin grants: add, check, revoke ------------------------------------------------


async def test_add_check_revoke(store: RedisGrants) -> None:
    g = await store.add("alice", "recording:1/demo-1", 60, "ticket 42", "admin")
    assert g.id.startswith("g-") and g.expires_at - g.created_at == pytest.approx(60, abs=0.01)
    assert (g.state, g.granted_by, g.activated_at) == ("active", "admin", g.expires_at - 60)
    assert await store.check("alice", ("recording:1/demo-1",)) == (g.id, g.expires_at)
    assert await store.check("bob", ("recording:1/demo-1",)) is None
    assert await store.get(g.id) == g
    revoked = await store.revoke(g.id, by="secops", comment="done")
    assert revoked is not None and revoked.id == g.id
    assert (revoked.state, revoked.ended_by, revoked.end_comment) == ("revoked", "secops", "done")
    assert revoked.ended_at == pytest.approx(time.time(), abs=1)
    assert await store.check("alice", ("recording:1/demo-1",)) is None
    assert await store.revoke(g.id) is None
    assert await store.get(g.id) == revoked
    assert await store.expires_at(g.id) is None


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
    assert 0 < await store.redis.pttl(active_key) <= 300
    history_ms = store.history_ttl * 1000
    assert history_ms < await store.redis.pttl(f"jit:grant:{g.id}") <= history_ms + 300
    await eventually(lambda: _gone(store.redis, active_key), what="the grant to expire")
    assert await store.check("alice", ("project:1",)) is None
    assert await store.redis.exists(active_key) == 0
    assert await store.list() == []
    assert await store.count_active() == 0
    expired = await store.get(g.id)
    assert expired is not None and expired.state == "expired" and expired.remaining() == 0
    assert [x.id for x in await store.list(states=["expired"])] == [g.id]
    # An expired grant can be neither revoked nor extended.
    assert await store.revoke(g.id) is None
    assert "is expired" in await refused("not_active", store.extend(g.id, "alice", 10, 3600))


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

    await store.add("alice", "project:1", 60, "r", "admin")
    monkeypatch.setattr(store.redis, "execute_command", counted_command)
    monkeypatch.setattr(store.redis, "pipeline", counted_pipeline)
    await store.check("alice", ("recording:1/demo-1", "project:1", "org:1"))  # loads the script
    trips.clear()
    assert await store.check("alice", ("recording:1/demo-1", "project:1", "org:1")) is not None
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


# --- the request lifecycle -------------------------------------------------------------


async def test_lifecycle_request_approve_twice_extend_relinquish(store: RedisGrants) -> None:
    g = await request(store, needed=2, duration=60)
    assert (g.state, g.needed, g.approvals, g.expires_at, g.activated_at) == (
        "pending", 2, (), 0.0, 0.0,
    )  # fmt: skip
    assert (g.ticket, g.entitlement, g.reason, g.duration) == ("T-1", "oncall", "INC-1", 60)
    assert g.pending_until == pytest.approx(g.created_at + 60, abs=0.01)
    assert await store.check("alice", ("project:1",)) is None
    assert await store.expires_at(g.id) is None
    assert [p.id for p in await store.list_pending()] == [g.id]

    first, activated = await store.approve(g.id, "bob", "looks fine")
    assert not activated and first.state == "pending"
    assert [(a.by, a.comment) for a in first.approvals] == [("bob", "looks fine")]
    assert await store.check("alice", ("project:1",)) is None

    await asyncio.sleep(0.1)  # intended: a gap between request and activation, checked below
    g, activated = await store.approve(g.id, "carol", "")
    assert activated and g.state == "active"
    assert [a.by for a in g.approvals] == ["bob", "carol"] and g.granted_by == "bob,carol"
    # The clock starts at the approval that activates it, not at the request.
    assert g.activated_at - g.created_at >= 0.09
    assert g.expires_at == pytest.approx(g.activated_at + 60, abs=0.002)
    assert await store.check("alice", ("project:1",)) == (g.id, g.expires_at)
    assert await store.expires_at(g.id) == g.expires_at
    assert await store.list_pending() == []
    assert await store.count_active() == 1
    assert await refused("not_pending", store.approve(g.id, "dave"))

    extended = await store.extend(g.id, "alice", 30, max_total=120)
    assert extended.expires_at == pytest.approx(g.expires_at + 30, abs=0.002)
    assert (extended.extensions, extended.extended_by) == (1, "alice")
    assert await store.check("alice", ("project:1",)) == (g.id, extended.expires_at)
    assert await store.expires_at(g.id) == extended.expires_at
    assert await store.redis.pttl(store._active_key("alice", "project:1")) > 85_000
    message = await refused("exceeds_max", store.extend(g.id, "alice", 60, max_total=120))
    assert message == "a total of 150s exceeds the maximum of 120s"
    assert (await store.get(g.id)) == extended

    assert "holder" in await refused("not_holder", store.relinquish(g.id, "bob"))
    ended = await store.relinquish(g.id, "alice", "done early")
    assert (ended.state, ended.ended_by, ended.end_comment) == (
        "relinquished",
        "alice",
        "done early",
    )
    assert await store.check("alice", ("project:1",)) is None
    assert await store.redis.exists(store._active_key("alice", "project:1")) == 0
    assert await store.get(g.id) == ended
    assert await store.expires_at(g.id) is None
    assert await store.count_active() == 0
    assert await refused("not_active", store.relinquish(g.id, "alice"))


async def test_self_approval_is_refused(store: RedisGrants) -> None:
    g = await request(store)
    assert await refused("self_approval", store.approve(g.id, "alice")) == (
        "cannot approve your own request"
    )
    assert (await store.get(g.id)) == g


async def test_duplicate_approval_is_refused(store: RedisGrants) -> None:
    g = await request(store, needed=2)
    await store.approve(g.id, "bob")
    message = await refused("duplicate_approval", store.approve(g.id, "bob"))
    assert message == "already approved by bob"
    after = await store.get(g.id)
    assert after is not None and after.state == "pending" and len(after.approvals) == 1


async def test_deny_and_withdraw(store: RedisGrants) -> None:
    g = await request(store)
    denied = await store.deny(g.id, "bob", "not this one")
    assert (denied.state, denied.ended_by, denied.end_comment) == ("denied", "bob", "not this one")
    assert await store.list_pending() == []
    assert "is denied" in await refused("not_pending", store.approve(g.id, "carol"))
    assert await refused("not_pending", store.deny(g.id, "bob"))
    assert await store.revoke(g.id) is None
    # The requester withdrawing their own request is a deny by them.
    mine = await request(store)
    assert (await store.deny(mine.id, "alice", "not needed")).state == "denied"


async def test_pending_request_lapses(store: RedisGrants) -> None:
    g = await request(store, pending_ttl=0.3)
    lapsed = await eventually(lambda: _in_state(store, g.id, "lapsed"), what="the lapse")
    assert lapsed is not None and lapsed.state == "lapsed"
    assert await store.list_pending() == []
    assert [x.id for x in await store.list(states=["lapsed"])] == [g.id]
    assert "is lapsed" in await refused("not_pending", store.approve(g.id, "bob"))
    assert await refused("not_pending", store.deny(g.id, "bob"))
    assert await store.check("alice", ("project:1",)) is None


async def test_request_needing_no_approval_is_active_at_once(store: RedisGrants) -> None:
    g = await request(store, needed=0, duration=30, break_glass=True)
    assert g.state == "active" and g.break_glass and g.granted_by == ""
    assert g.expires_at == pytest.approx(g.activated_at + 30, abs=0.002)
    assert g.activated_at == pytest.approx(g.created_at, abs=0.002)
    assert await store.check("alice", ("project:1",)) == (g.id, g.expires_at)
    assert await store.list_pending() == []
    d = g.to_dict()
    assert d["pending_until"] is None and d["ended_at"] is None and d["break_glass"] is True


async def test_revoking_a_pending_request_is_refused(store: RedisGrants) -> None:
    g = await request(store)
    assert await store.revoke(g.id, by="admin") is None
    assert await refused("not_active", store.relinquish(g.id, "alice"))
    assert await refused("not_active", store.extend(g.id, "alice", 10, 3600))
    assert (await store.get(g.id)) == g
    _, activated = await store.approve(g.id, "bob")
    assert activated


async def test_unknown_grant(store: RedisGrants) -> None:
    assert await refused("not_found", store.approve("g-nope", "bob")) == "no grant g-nope"
    assert await refused("not_found", store.deny("g-nope", "bob"))
    assert await refused("not_found", store.relinquish("g-nope", "alice"))
    assert await refused("not_found", store.extend("g-nope", "alice", 10, 60))
    assert await store.revoke("g-nope") is None
    assert await store.get("g-nope") is None
    assert await store.expires_at("g-nope") is None


async def test_bad_arguments(store: RedisGrants) -> None:
    with pytest.raises(ValueError):
        await request(store, duration=0)
    with pytest.raises(ValueError):
        await request(store, needed=-1)
    with pytest.raises(ValueError):
        await request(store, user="")
    with pytest.raises(ValueError):
        await store.add("alice", "project:1", 0, "r", "admin")
    with pytest.raises(ValueError):
        await store.list(states=["active", "gone"])
    with pytest.raises(ValueError):
        RedisGrants(store.redis, history_ttl=0)


async def test_ending_announces_on_the_channel(store: RedisGrants, replica: RedisGrants) -> None:
    feed = store.revocations()
    assert await anext(feed) is None
    kept = await store.add("alice", "project:1", 60, "r", "admin")
    given = await request(store, needed=0)
    await replica.extend(kept.id, "alice", 10, 3600)  # announced as "extended", not yielded
    await replica.relinquish(given.id, "alice")
    await replica.revoke(kept.id)
    assert await asyncio.wait_for(anext(feed), 2) == given.id
    assert await asyncio.wait_for(anext(feed), 2) == kept.id
    await feed.aclose()  # type: ignore[attr-defined]


async def test_a_feed_whose_connection_was_dropped_ends(redis_url: str) -> None:
    """jitgate's client retries once after a dropped connection, and redis-py then
    subscribes again by itself: what was announced in between would be missed without a
    word. The feed ends instead, so its followers treat it as lost (and fail closed)."""
    client = connect_redis(RedisSettings(url=redis_url))
    feed = RedisGrants(client).events(ping_every=0.05)
    killer = Redis.from_url(redis_url)
    try:
        assert await anext(feed) == ("subscribed", "")
        assert (await anext(feed))[0] == "heard"
        await killer.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

        async def drain() -> None:
            async for _ in feed:
                pass

        with pytest.raises(ConnectionError):
            await asyncio.wait_for(drain(), 5)
    finally:
        await feed.aclose()  # type: ignore[attr-defined]
        await killer.aclose()
        await client.aclose()


async def test_extended_message_format(store: RedisGrants) -> None:
    g = await store.add("alice", "project:1", 60, "r", "admin")
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(store.channel)
    await store.extend(g.id, "alice", 5, 3600)
    await store.revoke(g.id)
    seen: list[str] = []
    while len(seen) < 2:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        if msg is not None:
            seen.append(msg["data"].decode())
    assert seen == [f"extended {g.id}", f"revoked {g.id}"]
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_listing(store: RedisGrants) -> None:
    pending = await request(store, user="bob")
    admin = await store.add("alice", "project:2", 60, "r", "admin")
    ended = await request(store, needed=0)
    await store.relinquish(ended.id, "alice")
    other = await request(store, user="carol")
    everything = await store.list(states=None)
    assert [g.id for g in everything] == [other.id, ended.id, admin.id, pending.id]
    assert [g.state for g in everything] == ["pending", "relinquished", "active", "pending"]
    assert [g.id for g in await store.list("alice")] == [admin.id]
    assert [g.id for g in await store.list("alice", states=None)] == [ended.id, admin.id]
    assert [g.id for g in await store.list(states=["pending"])] == [other.id, pending.id]
    assert [g.id for g in await store.list_pending()] == [pending.id, other.id]
    assert [g.id for g in await store.list_pending("carol")] == [other.id]
    json.dumps([g.to_dict() for g in everything])


# --- history -------------------------------------------------------------------------


async def test_history_outlives_the_grant_then_goes(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    store = RedisGrants(client, "jit:", history_ttl=0.5)
    g = await request(store, needed=1)
    await store.approve(g.id, "bob", "ok")
    await store.revoke(g.id, by="secops", comment="incident over")
    assert await client.exists(store._active_key("alice", "project:1")) == 0
    kept = await store.get(g.id)
    assert kept is not None and kept.state == "revoked" and kept.approvals[0].comment == "ok"
    assert 0 < await client.pttl(f"jit:grant:{g.id}") <= 500
    assert [x.id for x in await store.list(states=None)] == [g.id]
    await eventually(lambda: _gone(client, f"jit:grant:{g.id}"), what="the record to expire")
    assert await store.get(g.id) is None
    assert await store.list(states=None) == []
    assert await client.keys("jit:*") == []  # the index sets expired by themselves too
    await client.aclose()


async def test_records_written_before_the_lifecycle_still_work(store: RedisGrants) -> None:
    now = time.time()
    key, active = "jit:grant:g-old", store._active_key("alice", "project:1")
    await store.redis.hset(key, mapping={
        "id": "g-old", "user": "alice", "scope": "project:1", "created_at": f"{now:.3f}",
        "expires_at": f"{now + 60:.3f}", "reason": "r", "granted_by": "admin",
    })  # fmt: skip
    await store.redis.zadd(active, {"g-old": int((now + 60) * 1000)})
    old = await store.get("g-old")
    assert old is not None and (old.state, old.activated_at) == ("active", float(f"{now:.3f}"))
    assert await store.expires_at("g-old") == float(f"{now + 60:.3f}")
    extended = await store.extend("g-old", "alice", 10, 3600)
    assert extended.expires_at == pytest.approx(now + 70, abs=0.01)
    revoked = await store.revoke("g-old")
    assert revoked is not None and revoked.state == "revoked"
    assert await store.check("alice", ("project:1",)) is None


# --- races: every transition is one script ---------------------------------------------


async def test_concurrent_approvals_activate_exactly_once(
    store: RedisGrants, replica: RedisGrants
) -> None:
    for i in range(50):
        g = await request(store, needed=1, scope=f"project:{i}")
        results = await asyncio.gather(
            store.approve(g.id, "bob"), replica.approve(g.id, "carol"), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, tuple)]
        lost = [r for r in results if isinstance(r, GrantError)]
        assert len(won) == 1 and won[0][1] is True, results
        assert len(lost) == 1 and lost[0].code == "not_pending"
        final = await store.get(g.id)
        assert final is not None and final.state == "active" and len(final.approvals) == 1
        assert final.granted_by == final.approvals[0].by
        assert await active_ids(store, scope=f"project:{i}") == {g.id}
    assert await store.count_active() == 50


async def test_third_concurrent_approver_of_two_needed_is_refused(
    store: RedisGrants, replica: RedisGrants
) -> None:
    for i in range(50):
        g = await request(store, needed=2, scope=f"project:{i}")
        results = await asyncio.gather(
            store.approve(g.id, "bob"),
            replica.approve(g.id, "carol"),
            store.approve(g.id, "dave"),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, tuple)]
        assert sorted(activated for _, activated in won) == [False, True], results
        assert [r.code for r in results if isinstance(r, GrantError)] == ["not_pending"]
        final = await store.get(g.id)
        assert final is not None and final.state == "active" and len(final.approvals) == 2
        assert await active_ids(store, scope=f"project:{i}") == {g.id}


async def test_approve_racing_revoke_ends_consistent(
    store: RedisGrants, replica: RedisGrants
) -> None:
    outcomes = set()
    for i in range(50):
        g = await request(store, needed=1, scope=f"project:{i}")
        approve, revoke = store.approve(g.id, "bob"), replica.revoke(g.id, by="admin")
        calls = (approve, revoke) if i % 2 else (revoke, approve)
        await asyncio.gather(*calls, return_exceptions=True)
        if i % 2 == 0:  # also revoke right after the approval, as a second admin might
            await replica.revoke(g.id)
        final = await store.get(g.id)
        assert final is not None and final.state in ("active", "revoked")
        live = await active_ids(store, scope=f"project:{i}")
        assert live == ({g.id} if final.state == "active" else set())
        found = await store.check("alice", (f"project:{i}",))
        assert (found is not None) == (final.state == "active")
        outcomes.add(final.state)
    assert outcomes <= {"active", "revoked"}
    assert await store.count_active() == sum(
        1 for g in await store.list(states=None) if g.state == "active"
    )


async def test_relinquish_racing_extend_ends_consistent(
    store: RedisGrants, replica: RedisGrants
) -> None:
    for i in range(50):
        g = await store.add("alice", f"project:{i}", 60, "r", "admin")
        calls = (store.relinquish(g.id, "alice"), replica.extend(g.id, "alice", 30, 3600))
        results = await asyncio.gather(*(calls if i % 2 else calls[::-1]), return_exceptions=True)
        final = await store.get(g.id)
        assert final is not None and final.state == "relinquished"
        extended = [r for r in results if isinstance(r, Grant) and r.state == "active"]
        refused_ = [r for r in results if isinstance(r, GrantError)]
        assert len(extended) + len(refused_) == 1, results
        assert all(r.code == "not_active" for r in refused_)
        assert final.extensions == len(extended)
        assert await active_ids(store, scope=f"project:{i}") == set()
        assert await store.check("alice", (f"project:{i}",)) is None
    assert await store.count_active() == 0


async def test_concurrent_extensions_stop_at_the_maximum(
    store: RedisGrants, replica: RedisGrants
) -> None:
    g = await store.add("alice", "project:1", 50, "r", "admin")
    results = await asyncio.gather(
        *((store, replica)[n % 2].extend(g.id, "alice", 10, 100) for n in range(20)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Grant) for r in results) == 5
    assert {r.code for r in results if isinstance(r, GrantError)} == {"exceeds_max"}
    final = await store.get(g.id)
    assert final is not None and final.extensions == 5
    assert final.expires_at == pytest.approx(final.activated_at + 100, abs=0.002)
    assert await store.check("alice", ("project:1",)) == (g.id, final.expires_at)


# --- break-glass review -----------------------------------------------------------------


async def break_glass(store: RedisGrants, **kw: Any) -> Grant:
    return await request(store, needed=0, break_glass=True, entitlement="break-glass", **kw)


async def unreviewed_ids(store: RedisGrants) -> list[str]:
    return [g.id for g in await store.list_unreviewed()]


async def test_review_of_break_glass_access(store: RedisGrants) -> None:
    g = await break_glass(store)
    other = await break_glass(store, user="olga", scope="project:2")
    assert await unreviewed_ids(store) == [g.id, other.id]
    assert (g.reviewed_by, g.reviewed_at, g.review_comment) == ("", 0.0, "")
    assert g.to_dict()["reviewed_at"] is None

    assert await refused("self_review", store.review(g.id, "alice")) == (
        "cannot review your own break-glass access"
    )
    reviewed = await store.review(g.id, "sam", "outage INC-7, access justified")
    assert (reviewed.reviewed_by, reviewed.review_comment) == (
        "sam",
        "outage INC-7, access justified",
    )
    assert reviewed.reviewed_at == pytest.approx(time.time(), abs=1)
    assert reviewed.state == "active"  # a review does not end the access
    assert await store.check("alice", ("project:1",)) == (g.id, g.expires_at)
    assert await store.get(g.id) == reviewed
    assert await unreviewed_ids(store) == [other.id]
    message = await refused("already_reviewed", store.review(g.id, "tess"))
    assert message == f"grant {g.id} was already reviewed by sam"
    assert await store.get(g.id) == reviewed


async def test_review_after_the_grant_ended(store: RedisGrants) -> None:
    revoked = await break_glass(store)
    await store.revoke(revoked.id, by="sam")
    relinquished = await break_glass(store, scope="project:2")
    await store.relinquish(relinquished.id, "alice")
    expired = await break_glass(store, scope="project:3", duration=0.2)
    await eventually(lambda: _in_state(store, expired.id, "expired"), what="the expiry")
    assert await unreviewed_ids(store) == [revoked.id, relinquished.id, expired.id]
    for grant_id, state in (
        (revoked.id, "revoked"), (relinquished.id, "relinquished"), (expired.id, "expired")
    ):  # fmt: skip
        done = await store.review(grant_id, "sam")
        assert (done.state, done.reviewed_by) == (state, "sam")
    assert await unreviewed_ids(store) == []


async def test_review_refuses_what_is_not_break_glass_access(store: RedisGrants) -> None:
    ordinary = await request(store, needed=0)
    assert await refused("not_break_glass", store.review(ordinary.id, "sam")) == (
        f"grant {ordinary.id} is not break-glass access"
    )
    admin = await store.add("alice", "project:2", 60, "r", "admin")
    assert await refused("not_break_glass", store.review(admin.id, "sam"))
    # Break-glass that waits for approval never gave access until approved.
    waiting = await request(store, needed=1, break_glass=True, scope="project:3")
    assert "never gave access" in await refused("not_active", store.review(waiting.id, "sam"))
    assert await unreviewed_ids(store) == []
    _, activated = await store.approve(waiting.id, "bob")
    assert activated and await unreviewed_ids(store) == [waiting.id]
    assert await refused("not_found", store.review("g-nope", "sam"))


async def test_unreviewed_entry_lives_as_long_as_the_record(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    store = RedisGrants(client, "jit:", history_ttl=0.5)
    g = await break_glass(store, duration=60)
    score = await client.zscore("jit:unreviewed", g.id)
    assert score == await client.zscore("jit:history", g.id)
    await store.extend(g.id, "alice", 30, 3600)
    assert await client.zscore("jit:unreviewed", g.id) == await client.zscore("jit:history", g.id)
    await store.revoke(g.id, by="sam")  # the record now goes history_ttl after the revocation
    assert await client.zscore("jit:unreviewed", g.id) == await client.zscore("jit:history", g.id)
    assert await unreviewed_ids(store) == [g.id]
    await eventually(lambda: _gone(client, "jit:unreviewed"), what="the set to expire")
    assert await unreviewed_ids(store) == []
    assert await client.keys("jit:*") == []  # the unreviewed set expired with its last entry
    await client.aclose()


async def test_concurrent_reviews_one_wins(store: RedisGrants, replica: RedisGrants) -> None:
    for i in range(30):
        g = await break_glass(store, scope=f"project:{i}")
        results = await asyncio.gather(
            store.review(g.id, "sam", "first"),
            replica.review(g.id, "tess", "second"),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Grant)]
        lost = [r for r in results if isinstance(r, GrantError)]
        assert len(won) == 1 and [e.code for e in lost] == ["already_reviewed"], results
        final = await store.get(g.id)
        assert final is not None and final.reviewed_by == won[0].reviewed_by
        assert final.review_comment == {"sam": "first", "tess": "second"}[final.reviewed_by]
    assert await store.list_unreviewed() == []


# --- what notifications read: grants about to expire, and a mark set once ---------------


async def test_expiring_between(store: RedisGrants) -> None:
    now = time.time()
    soon = await store.add("alice", "project:1", 30, "r", "admin")
    sooner = await store.add("bob", "project:1", 10, "r", "admin")
    later = await store.add("carol", "project:1", 600, "r", "admin")
    ended = await store.add("dave", "project:1", 20, "r", "admin")
    await store.revoke(ended.id)
    await request(store, needed=1)  # pending: not in the index
    assert [g.id for g in await store.expiring_between(now, now + 60)] == [sooner.id, soon.id]
    assert [g.id for g in await store.expiring_between(now + 15, now + 700)] == [soon.id, later.id]
    assert await store.expiring_between(now + 700, now + 800) == []


async def test_claim_notices_is_won_once(store: RedisGrants, replica: RedisGrants) -> None:
    assert await store.claim_notices("expiring", []) == []
    results = await asyncio.gather(
        *((store, replica)[n % 2].claim_notices("expiring", [("g-1", 60), ("g-2", 0.2)])
          for n in range(10))
    )  # fmt: skip
    assert [sum(r[i] for r in results) for i in (0, 1)] == [1, 1]
    assert 0 < await store.redis.pttl("jit:notified:expiring:g-2") <= 200
    await eventually(lambda: _gone(store.redis, "jit:notified:expiring:g-2"))
    assert await store.claim_notices("expiring", [("g-1", 60), ("g-2", 60)]) == [False, True]


# --- extension requests: approved like a request, applied to their grant atomically ----------


async def granted(store: RedisGrants, **kw: Any) -> Grant:
    """An active grant of alice's, requested and approved by bob."""
    g, activated = await store.approve((await request(store, **kw)).id, "bob")
    assert activated
    return g


async def extension(
    store: RedisGrants, grant: Grant, extra: float = 30, *, max_total: float = 120, **kw: Any
) -> Grant:
    args: dict[str, Any] = {"needed": 1, "pending_ttl": 60}
    args.update(kw)
    user = args.pop("user", grant.user)
    return await store.request_extension(grant.id, user, extra, max_total, **args)


async def test_extension_request_applied_to_its_grant(store: RedisGrants) -> None:
    g = await granted(store, duration=60)
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(store.channel)
    ext = await extension(store, g, 30, needed=2, comment="still debugging")
    assert (ext.kind, ext.extends, ext.state, ext.needed, ext.duration, ext.max_total) == (
        "extension", g.id, "pending", 2, 30, 120,
    )  # fmt: skip
    assert (ext.user, ext.scope, ext.entitlement, ext.ticket, ext.reason) == (
        "alice", "project:1", "oncall", "T-1", "still debugging",
    )  # fmt: skip
    assert ext.id != g.id and (ext.expires_at, ext.activated_at) == (0.0, 0.0)
    assert ext.pending_until == pytest.approx(ext.created_at + 60, abs=0.01)
    assert ext.to_dict()["max_total"] == 120 and g.to_dict()["max_total"] is None
    assert [p.id for p in await store.list_pending()] == [ext.id]
    parent = await store.get(g.id)
    assert parent is not None and parent.extension_request == ext.id
    assert parent.expires_at == g.expires_at and parent.extensions == 0
    assert await store.check("alice", ("project:1",)) == (g.id, g.expires_at)

    first, applied = await store.approve(ext.id, "bob", "ok")
    assert not applied and first.state == "pending"
    assert await store.get(g.id) == parent  # one approval of two changes nothing of the grant
    assert await refused("self_approval", store.approve(ext.id, "alice"))

    done, applied = await store.approve(ext.id, "carol", "fine")
    assert applied and (done.state, done.granted_by) == ("applied", "bob,carol")
    assert done.activated_at == pytest.approx(time.time(), abs=1)
    new_end = g.expires_at + 30
    assert done.expires_at == pytest.approx(new_end, abs=0.002)
    after = await store.get(g.id)
    assert after is not None and after.state == "active"
    assert after.expires_at == pytest.approx(new_end, abs=0.002)
    assert (after.extensions, after.extended_by, after.activated_at) == (
        1, "bob,carol", g.activated_at,
    )  # fmt: skip
    # Every index moved with it, in the same script.
    assert await store.check("alice", ("project:1",)) == (g.id, after.expires_at)
    assert await store.expires_at(g.id) == after.expires_at
    active_key = store._active_key("alice", "project:1")
    expiry_ms = round(after.expires_at * 1000)
    assert await store.redis.zscore(active_key, g.id) == expiry_ms
    assert await store.redis.pttl(active_key) > 85_000
    assert await store.redis.zscore("jit:grants", g.id) == expiry_ms
    assert await store.redis.zscore("jit:history", g.id) == expiry_ms + store._keep_ms
    assert await store.redis.pttl(f"jit:grant:{g.id}") > store._keep_ms + 85_000
    assert [x.id for x in await store.expiring_between(g.expires_at, new_end)] == [g.id]
    msg = None
    while msg is None:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert msg["data"].decode() == f"extended {g.id}"
    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # The request is done: not pending, not a grant, kept for history as "applied".
    assert await store.list_pending() == []
    assert await store.count_active() == 1
    assert [x.id for x in await store.list()] == [g.id]
    assert [x.id for x in await store.list(states=["applied"])] == [ext.id]
    assert await store.expires_at(ext.id) is None
    assert await refused("not_pending", store.approve(ext.id, "dave"))
    assert await refused("not_active", store.relinquish(ext.id, "alice"))
    assert await refused("not_active", store.extend(ext.id, "alice", 10, 3600))
    # Another may follow; without a comment it carries the grant's reason.
    again = await extension(store, g, 10)
    assert again.reason == "INC-1" and again.state == "pending"


async def test_extension_request_is_checked_when_made(store: RedisGrants) -> None:
    g = await granted(store, duration=60)
    assert await refused("not_holder", extension(store, g, user="bob")) == (
        f"only its holder can extend grant {g.id}"
    )
    message = await refused("exceeds_max", extension(store, g, 61, max_total=120))
    assert message == "a total of 121s exceeds the maximum of 120s"
    waiting = await request(store, scope="project:2")
    assert await refused("not_active", extension(store, waiting))
    nope = store.request_extension("g-nope", "alice", 1, 60, needed=1, pending_ttl=60)
    assert await refused("not_found", nope)
    with pytest.raises(ValueError):
        await extension(store, g, 0)
    with pytest.raises(ValueError):
        await extension(store, g, needed=0)
    with pytest.raises(ValueError):
        await extension(store, g, pending_ttl=0)
    assert await store.list_pending() == [waiting]

    first = await extension(store, g, 30)
    message = await refused("extension_pending", extension(store, g, 10))
    assert message == f"grant {g.id} already has extension request {first.id} pending"
    assert await refused("not_active", extension(store, first))  # no extending a request
    await store.deny(first.id, "bob")
    second = await extension(store, g, 10)  # the denied one no longer counts
    assert second.state == "pending"
    assert [p.id for p in await store.list_pending()] == [waiting.id, second.id]


async def test_deny_withdraw_and_lapse_leave_the_grant_alone(store: RedisGrants) -> None:
    g = await granted(store, duration=60)
    for ender in ("bob", "alice"):  # denied by an approver, withdrawn by its requester
        ext = await extension(store, g)
        before = await store.get(g.id)
        denied = await store.deny(ext.id, ender, "no")
        assert (denied.state, denied.ended_by, denied.kind) == ("denied", ender, "extension")
        assert await store.get(g.id) == before
        assert await refused("not_pending", store.approve(ext.id, "carol"))
    ext = await extension(store, g, pending_ttl=0.3)
    before = await store.get(g.id)
    lapsed = await eventually(lambda: _in_state(store, ext.id, "lapsed"), what="the lapse")
    assert lapsed is not None and lapsed.state == "lapsed"
    assert await refused("not_pending", store.approve(ext.id, "bob"))
    assert await store.get(g.id) == before
    assert await store.check("alice", ("project:1",)) == (g.id, g.expires_at)
    assert (await extension(store, g)).state == "pending"  # a lapsed one no longer counts


@pytest.mark.parametrize("end", ["relinquish", "revoke", "expire"])
async def test_extension_of_a_grant_that_ended_is_not_applied(store: RedisGrants, end: str) -> None:
    g = await granted(store, duration=0.3 if end == "expire" else 60)
    ext = await extension(store, g)
    if end == "relinquish":
        await store.relinquish(g.id, "alice")
    elif end == "revoke":
        await store.revoke(g.id, by="sam")
    else:
        await eventually(lambda: _in_state(store, g.id, "expired"), what="the expiry")
    ended = await store.get(g.id)
    states = {"relinquish": "relinquished", "revoke": "revoked", "expire": "expired"}
    assert ended is not None and ended.state == states[end]
    with pytest.raises(GrantError) as info:
        await store.approve(ext.id, "bob", "sure")
    state = ended.state
    assert (info.value.code, str(info.value)) == (
        "not_active", f"grant {g.id} is {state}, not active; extension {ext.id} was not applied"
    )  # fmt: skip
    lapsed = info.value.grant
    assert lapsed is not None and (lapsed.id, lapsed.state, lapsed.ended_by) == (
        ext.id, "lapsed", "bob",
    )  # fmt: skip
    assert lapsed.approvals == () and lapsed.end_comment == str(info.value)
    assert await store.get(ext.id) == lapsed
    assert await store.get(g.id) == ended  # untouched
    assert await store.check("alice", ("project:1",)) is None
    assert await store.list_pending() == []
    assert await refused("not_pending", store.approve(ext.id, "carol"))


async def test_extension_of_a_grant_gone_from_redis(store: RedisGrants) -> None:
    g = await granted(store)
    ext = await extension(store, g)
    await store.redis.delete(f"jit:grant:{g.id}")
    message = await refused("not_active", store.approve(ext.id, "bob"))
    assert message == f"grant {g.id} no longer exists; extension {ext.id} was not applied"


async def test_applied_extension_is_capped_at_the_recorded_maximum(store: RedisGrants) -> None:
    g = await granted(store, duration=60)
    ext = await extension(store, g, 50, max_total=120)  # 110 of 120 when requested
    await store.extend(g.id, "alice", 30, max_total=3600)  # e.g. under a policy since changed
    done, applied = await store.approve(ext.id, "bob")
    assert applied and done.state == "applied"
    after = await store.get(g.id)
    assert after is not None and after.extensions == 2
    assert after.expires_at == pytest.approx(g.activated_at + 120, abs=0.002)
    assert done.expires_at == after.expires_at
    assert await store.check("alice", ("project:1",)) == (g.id, after.expires_at)

    # Already at its maximum: the request ends lapsed and the grant stays as it is.
    short = await granted(store, duration=60, scope="project:2")
    ext = await extension(store, short, 10, max_total=70)
    await store.extend(short.id, "alice", 10, max_total=3600)
    before = await store.get(short.id)
    message = await refused("exceeds_max", store.approve(ext.id, "bob"))
    assert message == (
        f"grant {short.id} already lasts its maximum of 70s; extension {ext.id} was not applied"
    )
    assert await store.get(short.id) == before
    lapsed = await store.get(ext.id)
    assert lapsed is not None and lapsed.state == "lapsed"


async def test_concurrent_final_approvals_apply_an_extension_once(
    store: RedisGrants, replica: RedisGrants
) -> None:
    for i in range(30):
        g = await granted(store, duration=60, scope=f"project:{i}")
        ext = await extension(store, g, 30, max_total=3600)
        results = await asyncio.gather(
            store.approve(ext.id, "carol"), replica.approve(ext.id, "dave"), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, tuple)]
        lost = [r for r in results if isinstance(r, GrantError)]
        assert len(won) == 1 and won[0][1] is True and won[0][0].state == "applied", results
        assert [e.code for e in lost] == ["not_pending"] and lost[0].grant is None
        final = await store.get(g.id)
        assert final is not None and final.extensions == 1
        assert final.expires_at == pytest.approx(g.expires_at + 30, abs=0.002)
        assert final.extended_by == won[0][0].granted_by
        done = await store.get(ext.id)
        assert done is not None and len(done.approvals) == 1
        assert await store.check("alice", (f"project:{i}",)) == (g.id, final.expires_at)
    assert await store.count_active() == 30
    assert await store.list_pending() == []


async def test_extension_approval_racing_revoke_ends_consistent(
    store: RedisGrants, replica: RedisGrants
) -> None:
    for i in range(30):
        g = await granted(store, duration=60, scope=f"project:{i}")
        ext = await extension(store, g, 30, max_total=3600)
        calls = (store.approve(ext.id, "carol"), replica.revoke(g.id, by="sam"))
        await asyncio.gather(*(calls if i % 2 else calls[::-1]), return_exceptions=True)
        final, request_ = await store.get(g.id), await store.get(ext.id)
        assert final is not None and final.state == "revoked"
        assert request_ is not None and request_.state in ("applied", "lapsed")
        assert final.extensions == (request_.state == "applied")
        assert await active_ids(store, scope=f"project:{i}") == set()
    assert await store.count_active() == 0


async def test_sweep_writes_each_expiry_and_lapse_once(
    store: RedisGrants, replica: RedisGrants
) -> None:
    short = await store.add("alice", "project:1", 0.2, "r", "admin")
    long = await store.add("alice", "project:2", 60, "r", "admin")
    pending = await store.request(
        "bob", "project:1", duration=60, reason="r", needed=1, pending_ttl=0.2
    )
    revoked = await store.add("carol", "project:1", 0.2, "r", "admin")
    await store.revoke(revoked.id)

    async def both_ended() -> bool:
        expired = await _in_state(store, short.id, "expired")
        return expired is not None and await _in_state(store, pending.id, "lapsed") is not None

    await eventually(both_ended, what="the expiry and the lapse")
    # Two replicas sweep at once: each ending is written down by exactly one of them.
    a, b = await asyncio.gather(store.sweep(), replica.sweep())
    ended = sorted((g.id, g.state) for g in [*a, *b])
    assert ended == sorted([(short.id, "expired"), (pending.id, "lapsed")])
    again = await asyncio.gather(store.sweep(), replica.sweep())
    assert again == [[], []]
    swept = await store.get(short.id)
    assert swept is not None and swept.state == "expired" and swept.ended_by == "jitgate"
    assert swept.ended_at == pytest.approx(short.expires_at, abs=0.01)
    still = await store.get(long.id)
    assert still is not None and still.state == "active"
