"""The local grant view (proxy/grantview.py) against a real Redis: fast, and never stale.

Each test runs the view's follower on the store's real event feed, and changes grants
through another client, as another replica would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
from conftest import ROOT, RedisServer
from redis.asyncio import Redis
from waiting import eventually

from proxy.authorize import Authorizer
from proxy.grantstore import RedisGrants
from proxy.grantview import GrantView
from proxy.identity import Identity
from proxy.policyfile import compile_text

SCOPES = ("recording:1/demo-1", "project:1")


class Counting:
    """The real store, counting the checks that reach Redis."""

    def __init__(self, store: RedisGrants) -> None:
        self.store = store
        self.calls = 0

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        self.calls += 1
        return await self.store.check(user, scopes)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisGrants]:
    client = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    yield RedisGrants(client)
    await client.aclose()


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[RedisGrants]:
    """Another replica's store: its own connection to the same Redis."""
    client = Redis.from_url(redis_url)
    yield RedisGrants(client)
    await client.aclose()


async def following(view: GrantView, store: RedisGrants) -> asyncio.Task[None]:
    task = asyncio.create_task(view.follow(store.events))
    await eventually(view.current, what="the view to be current")
    return task


async def caught_up(view: GrantView) -> None:
    """Wait until the view has heard a ping sent after now: it has seen every change so far."""
    now = time.monotonic()
    await eventually(lambda: view._heard is not None and view._heard > now, what="a later ping")


async def add(view: GrantView, store: RedisGrants, user: str = "alice") -> str:
    """Add a grant and wait until the view has seen its announcement (which empties it)."""
    changes = view._generation
    grant = await store.add(user, "project:1", 60, "r", "admin")
    await eventually(lambda: view._generation > changes, what="the grant's announcement")
    return grant.id


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_found_grant_is_answered_from_memory_until_it_ends(store: RedisGrants) -> None:
    counting = Counting(store)
    view = GrantView(counting)
    task = await following(view, store)
    try:
        grant = await store.add("alice", "project:1", 0.6, "r", "admin")
        await caught_up(view)  # its "granted" announcement seen
        for _ in range(5):
            assert await view.check("alice", SCOPES) == (grant.id, grant.expires_at)
        assert counting.calls == 1 and view.hits == 4 and len(view) == 1
        # Another user, other scopes: asked, never answered from alice's entry.
        assert await view.check("bob", SCOPES) is None
        assert await view.check("alice", ("project:2",)) is None
        assert counting.calls == 3
        # Past its expiry the remembered answer is not used: Redis says no grant.
        await asyncio.sleep(max(0.0, grant.expires_at - time.time()) + 0.05)
        assert await view.check("alice", SCOPES) is None
        assert counting.calls == 4
    finally:
        await stop(task)


async def test_refusals_are_never_remembered(store: RedisGrants) -> None:
    counting = Counting(store)
    view = GrantView(counting)
    task = await following(view, store)
    try:
        assert await view.check("alice", SCOPES) is None
        grant = await store.add("alice", "project:1", 60, "r", "admin")
        # No wait for the feed: the grant works at once.
        assert await view.check("alice", SCOPES) == (grant.id, grant.expires_at)
        assert counting.calls == 2
    finally:
        await stop(task)


@pytest.mark.parametrize("end", ["revoke", "relinquish"])
async def test_an_end_on_another_replica_holds_here(
    store: RedisGrants, other: RedisGrants, end: str
) -> None:
    view = GrantView(store)
    task = await following(view, store)
    try:
        grant = await store.add("alice", "project:1", 60, "r", "admin")
        await caught_up(view)
        assert await view.check("alice", SCOPES) is not None
        assert await view.check("alice", SCOPES) is not None and view.hits == 1
        if end == "revoke":
            await other.revoke(grant.id)
        else:
            await other.relinquish(grant.id, "alice")
        await caught_up(view)
        assert len(view) == 0
        assert await view.check("alice", SCOPES) is None
    finally:
        await stop(task)


async def test_revocation_holds_within_100ms_over_200_revocations(
    store: RedisGrants, other: RedisGrants
) -> None:
    """How long after a revocation on another replica this view stops answering for it.

    Each round: a grant answered from memory, revoked through the other client, then the
    view asked until it refuses. The bound is what the view promises (its lag, 0.1 s).
    """
    view = GrantView(store, lag=0.1)
    task = await following(view, store)
    took: list[float] = []
    try:
        for i in range(200):
            user = f"user-{i}"
            grant = await store.add(user, "project:1", 60, "r", "admin")
            await caught_up(view)
            hits = view.hits
            assert await view.check(user, SCOPES) is not None
            assert await view.check(user, SCOPES) is not None and view.hits == hits + 1
            started = time.monotonic()
            await other.revoke(grant.id)

            async def refused(user: str = user) -> bool:
                return await view.check(user, SCOPES) is None

            await eventually(refused, interval=0.001, what="the revocation to hold")
            took.append(time.monotonic() - started)
    finally:
        await stop(task)
    took.sort()
    p99 = took[int(len(took) * 0.99) - 1]
    assert p99 <= 0.1, f"p99 {p99 * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms"


async def test_a_grant_made_elsewhere_replaces_a_wider_one_remembered(
    store: RedisGrants, other: RedisGrants
) -> None:
    view = GrantView(store)
    task = await following(view, store)
    try:
        wide = await store.add("alice", "project:1", 60, "r", "admin")
        await caught_up(view)
        assert (await view.check("alice", SCOPES) or ("",))[0] == wide.id
        narrow = await other.add("alice", "recording:1/demo-1", 60, "r", "admin")
        await caught_up(view)
        # The narrowest grant decides, as Redis would answer.
        assert (await view.check("alice", SCOPES) or ("",))[0] == narrow.id
    finally:
        await stop(task)


async def test_an_extension_elsewhere_is_seen(store: RedisGrants, other: RedisGrants) -> None:
    view = GrantView(store)
    task = await following(view, store)
    try:
        grant = await store.add("alice", "project:1", 60, "r", "admin")
        await caught_up(view)
        assert await view.check("alice", SCOPES) == (grant.id, grant.expires_at)
        longer = await other.extend(grant.id, "alice", 600, 3600)
        await caught_up(view)
        assert await view.check("alice", SCOPES) == (grant.id, longer.expires_at)
    finally:
        await stop(task)


async def test_an_answer_that_raced_a_change_is_used_once_but_not_kept(
    store: RedisGrants, other: RedisGrants
) -> None:
    """Redis answered before the revocation, the feed brought the revocation before the
    answer was read: the answer serves that one request (as without a view), no more."""
    grant = await store.add("alice", "project:1", 60, "r", "admin")

    class Racing:
        async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
            found = await store.check(user, scopes)
            await other.revoke(grant.id)
            await caught_up(view)
            return found

    view = GrantView(Racing())
    task = await following(view, store)
    try:
        assert await view.check("alice", SCOPES) == (grant.id, grant.expires_at)
        assert len(view) == 0
        view.store = store
        assert await view.check("alice", SCOPES) is None
    finally:
        await stop(task)


async def test_a_silent_feed_stops_the_view_and_redis_decides(own_redis: RedisServer) -> None:
    """Redis frozen (SIGSTOP): no ping is answered, so after `lag` the view answers nothing
    from memory; the check goes to Redis, times out, and the decision is a 503."""
    client = Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisGrants(client)
    view = GrantView(store, lag=0.1)
    task = await following(view, store)
    authorizer = Authorizer(compile_text(POLICY, "policy.yaml"), view)
    alice = Identity("alice")
    assert own_redis.proc is not None
    try:
        await store.add("alice", "recording:1/demo-1", 60, "r", "admin")
        await caught_up(view)
        assert (await authorizer.decide_for(alice, "GET", PATH)).allow
        assert (await authorizer.decide_for(alice, "GET", PATH)).allow and view.hits == 1
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: not view.current(), what="the view to go stale")
            decision = await authorizer.decide_for(alice, "GET", PATH)
            assert (decision.allow, decision.status) == (False, 503)
            assert view.hits == 1
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        # Redis answers again: so does the view, from Redis first.
        await eventually(view.current, what="the view to be current again")
        assert (await authorizer.decide_for(alice, "GET", PATH)).allow
    finally:
        await stop(task)
        await client.aclose()


async def test_losing_redis_empties_the_view_and_fails_closed(own_redis: RedisServer) -> None:
    client = Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisGrants(client)
    view = GrantView(store, lag=0.1)
    task = await following(view, store)
    authorizer = Authorizer(compile_text(POLICY, "policy.yaml"), view)
    alice = Identity("alice")
    try:
        await store.add("alice", "recording:1/demo-1", 60, "r", "admin")
        await caught_up(view)
        assert (await authorizer.decide_for(alice, "GET", PATH)).allow
        assert len(view) == 1
        own_redis.kill()
        await eventually(lambda: len(view) == 0 and not view.current(), what="the view lost")
        decision = await authorizer.decide_for(alice, "GET", PATH)
        assert (decision.allow, decision.status) == (False, 503)
        # A Redis that comes back empty (no persistence): the grant is gone, and so is access.
        own_redis.start()
        await eventually(view.current, within=20, what="the feed back")
        decision = await authorizer.decide_for(alice, "GET", PATH)
        assert (decision.allow, decision.status) == (False, 403)
    finally:
        await stop(task)
        await client.aclose()


async def test_a_redis_that_just_died_is_not_trusted_before_the_feed_notices(
    own_redis: RedisServer,
) -> None:
    client = Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisGrants(client)
    view = GrantView(store, lag=10.0)  # a lag that cannot be what refuses here
    task = await following(view, store)
    try:
        await add(view, store)
        assert await view.check("alice", SCOPES) is not None and len(view) == 1
        own_redis.kill()
        # Nothing has run on the event loop since: the feed has not seen the end of its
        # connection, but the view looks at the socket and does not answer.
        assert not view.current()
        with pytest.raises(Exception):  # noqa: B017 - whatever redis-py raises
            await view.check("alice", SCOPES)
        assert view.hits == 0
    finally:
        await stop(task)
        await client.aclose()


async def test_a_revocation_holds_once_its_announcement_arrived(
    store: RedisGrants, other: RedisGrants
) -> None:
    """As soon as the announcement is in this host's socket, before the feed has read it,
    the view stops answering: the wait below never lets the event loop (and the feed) run.
    """
    view = GrantView(store, lag=10.0)  # a lag that cannot be what refuses here
    task = await following(view, store)
    try:
        for i in range(20):
            user = f"user-{i}"
            grant_id = await add(view, store, user)
            assert await view.check(user, SCOPES) is not None and len(view) == 1
            await other.revoke(grant_id)
            deadline = time.monotonic() + 5
            while view.current():  # a blocking wait: the feed cannot run meanwhile
                assert time.monotonic() < deadline, "the announcement never arrived"
                time.sleep(0.0005)  # noqa: ASYNC251 - blocking on purpose, see above
            assert len(view) == 1  # still there: the feed has not read it yet
            assert await view.check(user, SCOPES) is None
    finally:
        await stop(task)


async def test_a_dropped_feed_connection_is_a_lost_feed(
    store: RedisGrants, other: RedisGrants
) -> None:
    """Redis drops the subscription's connection (CLIENT KILL) and stays up: redis-py
    would reconnect and subscribe again by itself, but announcements made in between are
    lost, so the view is emptied and trusts only what comes after."""
    view = GrantView(store)
    task = await following(view, store)
    try:
        await add(view, store)
        assert await view.check("alice", SCOPES) is not None and len(view) == 1
        changes = view._generation
        await other.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: view._generation > changes, what="the loss to be seen")
        assert len(view) == 0
        await eventually(view.current, what="the feed back")
        assert await view.check("alice", SCOPES) is not None  # from Redis, then kept
        assert await view.check("alice", SCOPES) is not None and len(view) == 1
    finally:
        await stop(task)


async def test_nothing_is_remembered_before_the_feed_is_current(store: RedisGrants) -> None:
    view = GrantView(store)
    await store.add("alice", "project:1", 60, "r", "admin")
    assert await view.check("alice", SCOPES) is not None
    assert len(view) == 0 and not view.current()


async def test_the_view_is_bounded(store: RedisGrants) -> None:
    view = GrantView(store, max_entries=3)
    task = await following(view, store)
    try:
        for i in range(4):
            await store.add(f"u{i}", "project:1", 60, "r", "admin")
        await caught_up(view)
        for i in range(3):
            await view.check(f"u{i}", SCOPES)
        assert len(view) == 3
        await view.check("u3", SCOPES)
        assert len(view) == 1  # emptied when full, then the new answer kept
    finally:
        await stop(task)


def test_lag_must_be_positive(store: RedisGrants) -> None:
    with pytest.raises(ValueError):
        GrantView(store, lag=0)


PATH = "/api/projects/1/session_recordings/demo-1/snapshots"
POLICY = (ROOT / "config" / "policy.yaml").read_text()
