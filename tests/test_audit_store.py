"""The Redis audit store: indexed writes, queries and paging, trimming, grant summaries."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.audit.store import WRITE_CHUNK, AuditStore, Page, Query

ROOT = Path(__file__).resolve().parent.parent
KEY = "jit:audit"
T0 = 1_764_424_800.0  # 2025-11-29T14:00:00Z
USERS = ("alice", "bob", "carol:ops", "dave smith")
RECORDINGS = ("r1", "r2", "r/3", "r 4", "r5")
EVENTS = ("access.allow", "access.allow", "access.allow", "access.deny", "grant.activated")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_url)
    yield c
    await c.aclose()


def rec(n: int, ts: float, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"rec-{n}", "ts": ts, "event": "access.allow"}
    out.update(fields)
    return out


def lines(records: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(r, separators=(",", ":")) for r in records]


def dataset(n: int = 300, seed: int = 7) -> list[dict[str, Any]]:
    """Return records over a day, several per millisecond, with every indexed field varied."""
    rnd = random.Random(seed)
    out = []
    ts = T0
    for i in range(n):
        if rnd.random() < 0.6:  # often several records share one millisecond
            ts = round(ts + rnd.choice((0.001, 0.5, 37.25)), 3)
        recording = rnd.choice(RECORDINGS)
        out.append(
            rec(
                i, ts, event=rnd.choice(EVENTS), user=rnd.choice(USERS),
                scope=f"recording:1/{recording}", recording=recording,
                grant_id=rnd.choice(("g-1", "g-2", "g-3")),
            )
        )  # fmt: skip
    return out


async def all_pages(store: AuditStore, q: Query) -> list[dict[str, Any]]:
    """Read every page of a query, checking each page's size against the limit."""
    out: list[dict[str, Any]] = []
    cursor = q.cursor
    for _ in range(10_000):
        page = await store.query(Query(**{**q.__dict__, "cursor": cursor}))
        assert len(page.records) <= q.limit
        if page.next is not None:
            assert len(page.records) == q.limit
        out.extend(page.records)
        cursor = page.next
        if cursor is None:
            return out
    raise AssertionError("paging did not end")


def expected(records: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    # Stream order within a timestamp: the records were written in list order.
    order = sorted(range(len(records)), key=lambda i: (records[i]["ts"], i))
    return [records[i]["id"] for i in order if keep(records[i])]


async def assert_indexes_consistent(client: Redis, key: str = KEY) -> None:
    """Check every index member names a stream entry and every entry is in the time index."""
    entries = {e[0].decode() for e in await client.xrange(key)}
    indexed_all: set[str] = set()
    async for name in client.scan_iter(match=f"{key}:idx:*"):
        assert await client.type(name) == b"zset", name
        members = [m.decode() for m in await client.zrange(name, 0, -1)]
        assert members, f"empty index key {name!r} left behind"
        for member in members:
            ms, seq = member.split("-")
            entry = f"{ms}-{int(seq)}"
            assert entry in entries, f"{name!r} points at missing entry {entry}"
            if name == f"{key}:idx:t".encode():
                indexed_all.add(entry)
    assert indexed_all == entries


# --- writing and querying -----------------------------------------------------------------

FILTERS: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ("all", {}, lambda r: True),
    ("user", {"user": "carol:ops"}, lambda r: r["user"] == "carol:ops"),
    ("user with space", {"user": "dave smith"}, lambda r: r["user"] == "dave smith"),
    ("scope", {"scope": "recording:1/r/3"}, lambda r: r["scope"] == "recording:1/r/3"),
    ("recording", {"recording": "r 4"}, lambda r: r["recording"] == "r 4"),
    ("grant", {"grant": "g-2"}, lambda r: r["grant_id"] == "g-2"),
    ("one event", {"events": ("access.deny",)}, lambda r: r["event"] == "access.deny"),
    (
        "two events",
        {"events": ("access.deny", "grant.activated")},
        lambda r: r["event"] in ("access.deny", "grant.activated"),
    ),
    (
        "user and events",
        {"user": "alice", "events": ("access.allow",)},
        lambda r: r["user"] == "alice" and r["event"] == "access.allow",
    ),
    (
        "grant, recording and user",
        {"grant": "g-1", "recording": "r1", "user": "bob"},
        lambda r: r["grant_id"] == "g-1" and r["recording"] == "r1" and r["user"] == "bob",
    ),
    (
        "scope and two events",
        {"scope": "recording:1/r2", "events": ("access.allow", "access.deny")},
        lambda r: r["scope"] == "recording:1/r2" and r["event"] != "grant.activated",
    ),
    ("no match", {"user": "alice", "recording": "nope"}, lambda r: False),
    ("unknown event", {"events": ("grant.nothing",)}, lambda r: False),
]


@pytest.mark.parametrize(("name", "kwargs", "keep"), FILTERS, ids=[f[0] for f in FILTERS])
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_query_by_filters(
    client: Redis,
    name: str,
    kwargs: dict[str, Any],
    keep: Callable[[dict[str, Any]], bool],
    order: str,
) -> None:
    records = dataset()
    store = AuditStore(client, KEY)
    await store.write(lines(records[:100]))
    await store.write(lines(records[100:]))
    want = expected(records, keep)
    if order == "desc":
        want.reverse()
    page = await store.query(Query(order=order, **kwargs))
    assert [r["id"] for r in page.records] == want
    assert page.next is None
    assert page.records == [records[int(i.split("-")[1])] for i in want]
    paged = await all_pages(store, Query(order=order, limit=4, **kwargs))
    assert [r["id"] for r in paged] == want


async def test_time_range_is_inclusive_since_exclusive_until(client: Redis) -> None:
    stamps = [T0 - 0.001, T0, T0 + 0.001, T0 + 0.1, T0 + 0.3, T0 + 0.7, T0 + 0.999, T0 + 1.0]
    records = [rec(i, round(ts, 3), user="alice") for i, ts in enumerate(stamps)]
    store = AuditStore(client, KEY)
    await store.write(lines(records))
    for since, until in [(T0, T0 + 1.0), (T0 + 0.1, T0 + 0.7), (T0 + 0.3, T0 + 0.3001), (0, T0)]:
        want = [r["id"] for r in records if since <= r["ts"] < until]
        for kwargs in ({}, {"user": "alice"}):
            page = await store.query(Query(since=since, until=until, **kwargs))
            assert [r["id"] for r in page.records] == want, (since, until, kwargs)
    assert (await store.query(Query(since=T0 + 1, until=T0))).records == []
    only_since = await store.query(Query(since=T0 + 0.999))
    assert [r["id"] for r in only_since.records] == ["rec-6", "rec-7"]
    only_until = await store.query(Query(until=T0, order="desc"))
    assert [r["id"] for r in only_until.records] == ["rec-0"]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize(
    ("limit", "kwargs"),
    [
        (7, {}),
        (1, {"user": "alice"}),
        (13, {"events": ("access.allow", "access.deny")}),
        (1000, {"user": "alice", "events": ("access.deny",)}),
        (2600, {}),
    ],
)
async def test_paging_through_one_millisecond(
    client: Redis, order: str, limit: int, kwargs: dict[str, Any]
) -> None:
    # 2,500 records with the same ts (more than a scan batch), written in three batches,
    # amid records just before and after it: pages must neither repeat nor skip any.
    records = [rec(0, T0 - 0.001, user="alice")]
    for i in range(1, 2501):
        user = "alice" if i % 3 else "bob"
        event = "access.deny" if i % 5 == 0 else "access.allow"
        records.append(rec(i, T0, user=user, event=event))
    records.append(rec(2501, T0 + 0.001, user="alice"))
    store = AuditStore(client, KEY)
    for part in (records[:1000], records[1000:1001], records[1001:]):
        await store.write(lines(part))

    def keep(r: dict[str, Any]) -> bool:
        return all((r["event"] in v) if k == "events" else r[k] == v for k, v in kwargs.items())

    want = expected(records, keep)
    if order == "desc":
        want.reverse()
    got = [r["id"] for r in await all_pages(store, Query(order=order, limit=limit, **kwargs))]
    assert len(got) == len(set(got))
    assert got == want


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_paging_on_after_the_cursor_record_is_gone(client: Redis, order: str) -> None:
    # The record a cursor names can be trimmed between two pages; the next page starts
    # from its timestamp and must still skip what the first page returned.
    records = [rec(i, T0, user="alice") for i in range(300)]
    store = AuditStore(client, KEY)
    await store.write(lines(records))
    first = await store.query(Query(user="alice", limit=120, order=order))
    assert first.next is not None
    member = first.next.rsplit(":", 1)[1]
    async for name in client.scan_iter(match=f"{KEY}:idx:*"):
        await client.zrem(name, member)
    ms, seq = member.split("-")
    await client.xdel(KEY, f"{ms}-{int(seq)}")
    rest = await all_pages(store, Query(user="alice", limit=50, order=order, cursor=first.next))
    want = [r["id"] for r in records[120:]] if order == "asc" else [r["id"] for r in records[:180]]
    if order == "desc":
        want.reverse()
    assert [r["id"] for r in rest] == want


async def test_cursor_is_checked(client: Redis) -> None:
    store = AuditStore(client, KEY)
    await store.write(lines([rec(i, T0 + i) for i in range(5)]))
    page = await store.query(Query(limit=2))
    assert page.next is not None
    with pytest.raises(ValueError, match="other order"):
        await store.query(Query(limit=2, cursor=page.next, order="desc"))
    for bad in ("garbage", "a:x:1-1", "a:1.0:nope", "a:nan:1-1"):
        with pytest.raises(ValueError, match="bad cursor"):
            await store.query(Query(cursor=bad))
    with pytest.raises(ValueError):
        Query(limit=0)
    with pytest.raises(ValueError):
        Query(order="newest")
    with pytest.raises(ValueError):
        Query(since=float("nan"))


async def test_values_with_separators_do_not_collide(client: Redis) -> None:
    records = [
        rec(0, T0, user="x", scope="x"),
        rec(1, T0 + 1, user="recording:x", recording="x"),
        rec(2, T0 + 2, user="é😀 a/b:c", grant_id="user:x"),
        rec(3, T0 + 3, user=""),
    ]
    store = AuditStore(client, KEY)
    await store.write(lines(records))

    async def ids(**kw: Any) -> list[str]:
        return [r["id"] for r in (await store.query(Query(**kw))).records]

    assert await ids(user="x") == ["rec-0"]
    assert await ids(scope="x") == ["rec-0"]
    assert await ids(recording="x") == ["rec-1"]
    assert await ids(user="recording:x") == ["rec-1"]
    assert await ids(user="é😀 a/b:c") == ["rec-2"]
    assert await ids(grant="user:x") == ["rec-2"]
    assert await ids(user="") == ["rec-3"]
    assert await ids(grant="x") == []


async def test_record_lacking_fields_is_stored_and_found(client: Redis) -> None:
    store = AuditStore(client, KEY)
    before = (await client.time())[0]
    await store.write(['{"event":"policy.reloaded"}', '{"id":"bare"}', '{"ts":"yesterday"}'])
    after = (await client.time())[0] + 1
    page = await store.query(Query())
    assert page.records == [{"event": "policy.reloaded"}, {"id": "bare"}, {"ts": "yesterday"}]
    # Without a usable ts, a record is placed at the time it was written, by index and filter.
    assert [r.get("event") for r in (await store.query(Query(since=before, until=after))).records]
    assert (await store.query(Query(until=before))).records == []
    by_event = await store.query(Query(events=("policy.reloaded",)))
    assert by_event.records == [{"event": "policy.reloaded"}]
    assert (await store.query(Query(user="alice"))).records == []
    await assert_indexes_consistent(client)


async def test_odd_ts_values_fall_back_to_write_time(client: Redis) -> None:
    store = AuditStore(client, KEY)
    odd = ['{"user":"u","ts":NaN}', '{"user":"u","ts":Infinity}', '{"user":"u","ts":true}']
    odd.append('{"user":"u","ts":1e400}')
    await store.write(odd)
    now = float((await client.time())[0])
    page = await store.query(Query(user="u", since=now - 60, until=now + 60))
    assert len(page.records) == 4
    assert (await store.query(Query(user="u", until=now - 60))).records == []


async def test_malformed_line_is_kept_unindexed(
    client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = AuditStore(client, KEY)
    batch = [*lines([rec(0, T0, user="alice")]), "{not json", "[1, 2]"]
    batch += lines([rec(3, T0 + 1, user="alice")])
    with caplog.at_level(logging.WARNING, logger="jitgate.auditstore"):
        await store.write(batch)
    assert "2 of 4 lines were not JSON objects" in caplog.text
    entries = await client.xrange(KEY)
    assert [e[1][b"record"].decode() for e in entries] == batch
    assert await client.zcard(store.index_key("t")) == 4
    assert await client.zcard(store.index_key("user", "alice")) == 2
    everything = (await store.query(Query(since=0))).records
    malformed = [r for r in everything if r.get("malformed")]
    assert [r["raw"] for r in malformed] == ["{not json", "[1, 2]"]
    assert all(isinstance(r["ts"], float) and r["time"].endswith("+00:00") for r in malformed)
    assert [r["id"] for r in (await store.query(Query(user="alice"))).records] == [
        "rec-0",
        "rec-3",
    ]
    await assert_indexes_consistent(client)


async def test_write_survives_script_flush(client: Redis) -> None:
    store = AuditStore(client, KEY)
    await store.write(lines([rec(0, T0, user="alice")]))
    await client.script_flush()
    await store.write(lines([rec(1, T0 + 1, user="alice")]))
    await client.script_flush()
    page = await store.query(Query(user="alice"))
    assert [r["id"] for r in page.records] == ["rec-0", "rec-1"]
    await client.script_flush()
    assert await store.maintain() == 0
    await client.script_flush()
    assert set(await store.grant_reasons(["g"])) == set()


async def test_resent_batch_is_written_once(client: Redis) -> None:
    # A client library that re-sends the call after a timeout sends the same marker again.
    store = AuditStore(client, KEY)
    marker = f"{KEY}:w:fixed"
    args = [store.prefix, 600, *lines([rec(0, T0), rec(1, T0 + 1)])]
    assert await store._write(keys=[KEY, marker], args=args) == 0
    assert await store._write(keys=[KEY, marker], args=args) == -1
    assert await client.xlen(KEY) == 2
    assert 0 < await client.ttl(marker) <= 600


async def test_a_batch_goes_a_few_records_per_script_call(client: Redis) -> None:
    """Redis serves nobody else while a script runs: a big batch must not hold it up (the
    soak found 256 records in one call taking 30 to 90 ms, and the breaker opening)."""

    async def calls() -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    store = AuditStore(client, KEY)
    batch = lines(dataset(100))
    await store.write(batch[:1])  # loads the script (EVALSHA after that)
    before = await calls()
    await store.write(batch[1:])
    assert WRITE_CHUNK <= 64 and await calls() - before == -(-99 // WRITE_CHUNK)  # 4 calls
    assert await client.xlen(KEY) == 100
    # A batch whose first call was written and whose next one failed: the sink sends the
    # whole batch again, and nothing is written twice.
    more = lines([rec(100 + i, T0 + 100 + i) for i in range(50)])
    await store.write(more[:WRITE_CHUNK])
    await store.write(more)
    assert await client.xlen(KEY) == 150
    await store.write(more)  # and again, as a client library re-sending after a timeout
    assert await client.xlen(KEY) == 150
    batch += more
    page = await store.query(Query(limit=200))
    ids = sorted(r["id"] for r in page.records)
    assert ids == sorted(json.loads(line)["id"] for line in batch)
    await assert_indexes_consistent(client)


async def test_works_with_decoded_responses(redis_url: str) -> None:
    c = Redis.from_url(redis_url, decode_responses=True)
    try:
        store = AuditStore(c, KEY)
        await store.write(lines([rec(i, T0, user="alice", grant_id="g") for i in range(5)]))
        page = await store.query(Query(user="alice", limit=2))
        rest = await store.query(Query(user="alice", limit=10, cursor=page.next))
        assert [r["id"] for r in page.records + rest.records] == [f"rec-{i}" for i in range(5)]
        summary = await store.summary("g")
        assert summary is not None and summary["requests"]["allowed"] == 5
    finally:
        await c.aclose()


async def test_entry_removed_behind_the_store_is_skipped(client: Redis) -> None:
    # e.g. an older replica still trimming with XADD MAXLEN during a rolling upgrade
    store = AuditStore(client, KEY)
    await store.write(lines([rec(i, T0 + i, user="alice") for i in range(3)]))
    first = (await client.xrange(KEY, count=1))[0][0]
    await client.xdel(KEY, first)
    page = await store.query(Query(user="alice"))
    assert [r["id"] for r in page.records] == ["rec-1", "rec-2"]


# --- trimming ------------------------------------------------------------------------------


async def test_maintain_trims_to_maxlen_without_dangling_members(client: Redis) -> None:
    records = dataset(3000, seed=3)
    # Users and grants that only the oldest records have: their index keys must go.
    for r in records[:50]:
        r.update(user="early", grant_id="g-early", event="grant.approved")
    store = AuditStore(client, KEY, maxlen=1000, trim_chunk=128)
    for i in range(0, 3000, 250):
        await store.write(lines(records[i : i + 250]))
    assert await store.maintain() == 2000
    assert await client.xlen(KEY) == 1000
    assert await store.maintain() == 0
    await assert_indexes_consistent(client)
    for gone in (("user", "early"), ("grant", "g-early"), ("lifecycle", "g-early")):
        assert not await client.exists(store.index_key(*gone))
    newest = [r["id"] for r in records[2000:]]
    got = [r["id"] for r in (await store.query(Query(limit=5000))).records]
    assert sorted(got) == sorted(newest)
    alice = await store.query(Query(user="alice", limit=5000))
    assert sorted(r["id"] for r in alice.records) == sorted(
        r["id"] for r in records[2000:] if r["user"] == "alice"
    )


async def test_maintain_to_zero_keeps_new_writes_working(client: Redis) -> None:
    store = AuditStore(client, KEY, maxlen=0, trim_chunk=10)
    await store.write(lines([rec(i, T0 + i, user="alice") for i in range(25)]))
    assert await store.maintain() == 25
    assert await client.xlen(KEY) == 0
    assert [k async for k in client.scan_iter(match=f"{KEY}:idx:*")] == []
    await store.write(lines([rec(99, T0, user="alice")]))
    assert [r["id"] for r in (await store.query(Query(user="alice"))).records] == ["rec-99"]


async def test_maintain_trims_by_retention_and_reindex(client: Redis) -> None:
    store = AuditStore(client, KEY, maxlen=None, retention=3600, trim_chunk=64)
    now_ms = int((await client.time())[0]) * 1000
    # Entries two hours old, added as an older sink did (no index), then indexed.
    old = [rec(i, T0 + i, user="old-user", grant_id="g-old") for i in range(150)]
    for i, line in enumerate(lines(old)):
        await client.xadd(KEY, {"record": line}, id=f"{now_ms - 7_200_000}-{i}")
    assert await store.reindex(chunk=40) == 150
    assert await store.reindex(chunk=40) == 150  # again: nothing is doubled
    assert await client.zcard(store.index_key("user", "old-user")) == 150
    await store.write(lines([rec(1000 + i, T0 + i, user="new-user") for i in range(20)]))
    assert len((await store.query(Query(since=0, limit=5000))).records) == 170
    await assert_indexes_consistent(client)

    assert await store.maintain() == 150
    assert await client.xlen(KEY) == 20
    await assert_indexes_consistent(client)
    assert not await client.exists(store.index_key("user", "old-user"))
    assert len((await store.query(Query(user="new-user"))).records) == 20
    # Without any limit configured there is nothing to trim.
    assert await AuditStore(client, KEY, maxlen=None).maintain() == 0


async def test_concurrent_maintain_from_two_clients(redis_url: str) -> None:
    a, b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        one = AuditStore(a, KEY, maxlen=500, trim_chunk=50)
        two = AuditStore(b, KEY, maxlen=500, trim_chunk=50)
        records = dataset(4000, seed=11)
        for i in range(0, 4000, 500):
            await one.write(lines(records[i : i + 500]))
        removed = await asyncio.gather(one.maintain(), two.maintain(), one.maintain())
        assert sum(removed) == 3500
        assert await a.xlen(KEY) == 500
        await assert_indexes_consistent(a)
        got = (await two.query(Query(limit=1000))).records
        assert [r["id"] for r in got] == expected(records[3500:], lambda r: True)
    finally:
        await a.aclose()
        await b.aclose()


async def test_trimming_while_writing(redis_url: str) -> None:
    a, b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        writer = AuditStore(a, KEY, maxlen=300, trim_chunk=25)
        trimmer = AuditStore(b, KEY, maxlen=300, trim_chunk=25)

        async def write() -> None:
            for i in range(40):
                await writer.write(lines([rec(i * 50 + j, T0 + i, user="u") for j in range(50)]))

        async def trim() -> None:
            for _ in range(40):
                await trimmer.maintain()
                await asyncio.sleep(0)  # intended: no wait, a yield so writes interleave

        await asyncio.gather(write(), trim())
        await trimmer.maintain()
        assert await a.xlen(KEY) == 300
        await assert_indexes_consistent(a)
    finally:
        await a.aclose()
        await b.aclose()


# --- grant summaries -------------------------------------------------------------------------


def grant_trail() -> list[dict[str, Any]]:
    g = {"grant_id": "g-9", "user": "alice", "scope": "recording:1/abc"}
    acc = {**g, "method": "GET", "route": "recording", "recording": "abc"}
    snap = "/api/projects/1/session_recordings/abc/snapshots"
    meta = "/api/projects/1/session_recordings/abc"
    return [
        rec(0, T0, event="grant.requested", reason="INC-1 debug", ticket="INC-1", actor="alice",
            state="pending", entitlement="support", **g),
        rec(1, T0, event="break_glass", reason="INC-1 debug", actor="alice", **g),
        rec(2, T0 + 1, event="access.allow", user="bob", scope="recording:1/abc"),  # other grant
        rec(3, T0 + 5, event="grant.approved", actor="bob", comment="ok", approvers=["bob"],
            state="active", reason="INC-1 debug", **g),
        rec(4, T0 + 5, event="grant.activated", state="active", expires_at=T0 + 3600, **g),
        rec(5, T0 + 10, path=meta, status=200, bytes=100, time="2025-11-29T14:00:10.000+00:00",
            **{**acc, "event": "access.allow"}),
        rec(6, T0 + 11, path=snap, status=200, bytes=5000, time="2025-11-29T14:00:11.000+00:00",
            **{**acc, "event": "access.allow"}),
        rec(7, T0 + 12, path=snap, status=304, bytes=0, time="2025-11-29T14:00:12.000+00:00",
            **{**acc, "event": "access.allow"}),
        rec(8, T0 + 13, path=snap, status=403, bytes=99, time="2025-11-29T14:00:13.000+00:00",
            **{**acc, "event": "access.deny"}),
        rec(9, T0 + 14, path="/api/projects/1/session_recordings/xyz", status=200, bytes=7,
            time="2025-11-29T14:00:14.000+00:00",
            **{**acc, "event": "access.allow", "recording": "xyz", "method": "HEAD"}),
        rec(10, T0 + 20, event="grant.extended", actor="bob", expires_at=T0 + 7200, **g),
        rec(11, T0 + 30, event="grant.revoked", actor="carol", comment="done", state="revoked",
            **g),
    ]  # fmt: skip


async def test_summary(client: Redis) -> None:
    store = AuditStore(client, KEY)
    await store.write(lines(grant_trail()))
    s = await store.summary("g-9")
    assert s is not None
    assert (s["grant_id"], s["user"], s["scope"]) == ("g-9", "alice", "recording:1/abc")
    assert (s["reason"], s["ticket"], s["entitlement"]) == ("INC-1 debug", "INC-1", "support")
    assert s["approvers"] == ["bob"] and s["break_glass"] is True and s["state"] == "revoked"
    assert [e["event"] for e in s["events"]] == [
        "grant.requested", "break_glass", "grant.approved", "grant.activated", "grant.extended",
        "grant.revoked",
    ]  # fmt: skip
    assert s["events"][2] == {
        "event": "grant.approved", "ts": T0 + 5, "actor": "bob", "comment": "ok",
        "approvers": ["bob"], "state": "active", "reason": "INC-1 debug",
    }  # fmt: skip
    assert s["events"][4]["expires_at"] == T0 + 7200
    assert s["requests"] == {"allowed": 4, "denied": 1}
    assert s["bytes"] == 5107
    assert s["first_access"] == "2025-11-29T14:00:10.000+00:00"
    assert s["last_access"] == "2025-11-29T14:00:14.000+00:00"
    assert s["recordings"] == ["abc", "xyz"]
    assert [(r["method"], r["path"]) for r in s["resources"]] == [
        ("GET", "/api/projects/1/session_recordings/abc"),
        ("GET", "/api/projects/1/session_recordings/abc/snapshots"),
        ("HEAD", "/api/projects/1/session_recordings/xyz"),
    ]
    snapshots = s["resources"][1]
    assert snapshots == {
        "path": "/api/projects/1/session_recordings/abc/snapshots", "method": "GET",
        "requests": 3, "denied": 1, "bytes": 5000, "first": "2025-11-29T14:00:11.000+00:00",
        "last": "2025-11-29T14:00:13.000+00:00", "statuses": {"200": 1, "304": 1, "403": 1},
    }  # fmt: skip
    assert await store.summary("g-unknown") is None
    json.dumps(s)  # the CLI and API print it as JSON


async def test_summary_of_a_large_grant(client: Redis) -> None:
    store = AuditStore(client, KEY)
    trail = [rec(0, T0, event="grant.requested", grant_id="big", user="u", reason="why")]
    for i in range(1, 12_001):  # more than a scan batch
        event = "access.deny" if i % 100 == 0 else "access.allow"
        trail.append(
            rec(i, round(T0 + i / 100, 3), event=event, grant_id="big", user="u",
                method="GET", path=f"/p/{i % 7}", status=200, bytes=10, recording=f"r{i % 3}")
        )  # fmt: skip
    for i in range(0, len(trail), 2000):
        await store.write(lines(trail[i : i + 2000]))
    s = await store.summary("big")
    assert s is not None
    assert s["requests"] == {"allowed": 11_880, "denied": 120}
    assert s["bytes"] == 118_800
    assert sum(r["requests"] for r in s["resources"]) == 12_000
    assert [r["path"] for r in s["resources"]] == [f"/p/{i % 7}" for i in range(1, 8)]
    assert s["recordings"] == ["r1", "r2", "r0"] and s["reason"] == "why"


async def test_grant_reasons(client: Redis) -> None:
    store = AuditStore(client, KEY)
    trail = grant_trail()
    trail += [
        rec(20, T0 + 40, event="grant.requested", grant_id="g-10", user="dan", scope="s",
            reason="audit", ticket="T-2"),
        rec(21, T0 + 41, event="grant.approved", grant_id="g-10", actor="erin", reason="audit"),
        rec(22, T0 + 42, event="grant.approved", grant_id="g-10", actor="frank", reason="audit"),
        rec(23, T0 + 43, event="access.allow", grant_id="g-10", user="dan", reason="ignored"),
        rec(24, T0 + 44, event="grant.expired", grant_id="g-11", user="gil", reason="late"),
    ]  # fmt: skip
    await store.write(lines(trail))
    why = await store.grant_reasons(["g-10", "g-9", "g-10", "g-none", "g-11"])
    assert set(why) == {"g-9", "g-10", "g-11"}
    assert why["g-9"]["reason"] == "INC-1 debug" and why["g-9"]["ticket"] == "INC-1"
    assert why["g-9"]["approvers"] == ["bob"] and why["g-9"]["break_glass"] is True
    assert why["g-10"] == {
        "user": "dan", "scope": "s", "entitlement": None, "reason": "audit", "ticket": "T-2",
        "approvers": ["erin", "frank"], "break_glass": False, "state": None,
    }  # fmt: skip
    # Its request was trimmed: the reason its other lifecycle records repeat is used.
    assert why["g-11"]["reason"] == "late" and why["g-11"]["user"] == "gil"
    assert await store.grant_reasons([]) == {}


# --- the benchmark script --------------------------------------------------------------------


@pytest.mark.parametrize("own_server", [True, False], ids=["own-redis", "redis-url"])
def test_benchmark_script_runs(redis_server: Any, own_server: bool) -> None:
    argv = [sys.executable, str(ROOT / "bench" / "audit_query.py"), "--records", "3000"]
    argv += ["--runs", "3"]
    if not own_server:
        argv += ["--redis-url", redis_server.url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"write rate\s+[\d,]+ records/s", out), out
    assert re.search(r"memory\s+[\d,]+ bytes/record", out), out
    for label in ("who viewed recording", "what user viewed", "grant summary", "time range"):
        assert re.search(rf"{label}.*\d+\.\d+ ms", out), (label, out)


def test_page_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Page([], None).next = "x"  # type: ignore[misc]
