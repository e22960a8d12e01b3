"""The audit trail in Redis: a stream of records with indexes, trimming, queries and summaries.

`AuditStore` is the Redis audit sink (`write`, `maintain`, `close`) and the reader behind
`jitgate audit` queries and grant summaries (`query`, `summary`, `grant_reasons`). Records
are the JSON lines the audit log serialises; this module reads only the fields it indexes
and never changes a line.

Keys (`key` is the stream key, e.g. `jit:audit`):
  {key}                          stream, one entry per record, field `record` = the JSON line
  {key}:idx:t                    sorted set of every entry
  {key}:idx:user:{user}          entries whose `user` is that string
  {key}:idx:scope:{scope}        ... `scope`
  {key}:idx:recording:{id}       ... `recording`
  {key}:idx:grant:{grant_id}     ... `grant_id`
  {key}:idx:subject:{subject}    ... `subject` (whose recording: audit/subjects.py)
  {key}:idx:event:{event}        ... `event`
  {key}:idx:lifecycle:{grant_id} the grant's own events (`grant.*` and `break_glass`)
  {key}:w:{token}                marks a batch as written for 10 minutes (see `write`)
Values go into key names raw: the kind before them keeps kinds apart, and only string
values are indexed. Index members are entry ids with the sequence zero-padded to ten
digits (`1764424800123-0000000002`), so records of the same millisecond sort in stream
order; the score is the record's `ts` in milliseconds (a float), or the entry id's time
when `ts` is missing or not a finite number.

An entry and its index members are added by one Lua script and removed by one Lua script,
so an index member never points at a trimmed entry. A line that is not a JSON object is
still stored (nothing is dropped), indexed only in `{key}:idx:t` at the time it was written,
and read back as `{"malformed": true, "raw": line, "ts": ..., "time": ...}`.

The index keys are computed inside the scripts, so on Redis Cluster `key` must carry a hash
tag (e.g. `{jit}:audit`) that puts every key of the trail in one slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from .. import lua
from ..redisha import durable_script
from ..settings import Settings
from .pairs import ACCESS_EVENTS, note_access
from .query import Page, Query

__all__ = ["AuditStore", "Page", "Query", "store_for"]

log = logging.getLogger("jitgate.auditstore")

Record = dict[str, Any]

# Events that belong to a grant's own lifecycle, as opposed to accesses made under it.
_LIFECYCLE_PREFIX = "grant."
_BREAK_GLASS = "break_glass"

# Fields copied from each lifecycle record into a summary's `events`.
_STEP_FIELDS = (
    "event", "time", "ts", "actor", "comment", "reason", "ticket", "approvers", "expires_at",
    "state", "entitlement", "break_glass", "extends",
)  # fmt: skip

_BATCH_TTL = 600
# Records per write script call: each record is a JSON decode, an XADD and about six ZADDs,
# and Redis serves nobody else while a script runs. 256 in one call took 30 to 90 ms on a
# 2-core machine, long enough to hold every grant check past the breaker's
# `redis.breaker_trip_after` (the soak found it); 32 keep a call to a few milliseconds.
WRITE_CHUNK = 32
_SEQ_WIDTH = 10
# Entries read per script call at most: about 8 ms of Redis time, so a long scan never
# holds up the grant checks for long.
_MAX_BATCH = 2000
_LIFECYCLE_MAX = 10_000
# Index ranges are widened by a millisecond on each side and the exact [since, until) test
# is made on the decoded record, so float rounding of ts * 1000 can never lose a record.
_SLACK_MS = 1.0
_MEMBER = re.compile(r"(\d+)-(\d+)")
# The filters with an index: the Query field (also the index kind) and the record field.
_INDEXED = (
    ("grant", "grant_id"), ("recording", "recording"), ("scope", "scope"), ("user", "user"),
    ("subject", "subject"),
)  # fmt: skip

# The scripts (proxy/lua/audit_*.lua, each saying its KEYS and ARGV). The index library is
# shared by every script that adds or removes index members, so that trimming removes
# exactly the members that writing added.
_INDEX_LUA = lua.read("audit_index").replace("SEQ_WIDTH", str(_SEQ_WIDTH))
_WRITE = lua.compose("audit_write", _INDEX_LUA)
_TRIM = lua.compose("audit_trim", _INDEX_LUA)
_REINDEX = lua.compose("audit_reindex", _INDEX_LUA)
_PAGE = lua.compose("audit_page", _INDEX_LUA)


Position = tuple[float, str]
Hit = tuple[float, str, Any]


class AuditStore:
    """Keep the audit trail in a Redis stream with indexes; trim it; answer queries."""

    name = "redis"

    def __init__(
        self,
        redis: Redis,
        key: str,
        *,
        maxlen: int | None = 1_000_000,
        retention: float | None = None,
        trim_chunk: int = 100,
        wait: tuple[int, float] = (0, 0.0),  # WAIT (replicas, seconds) after each write
    ) -> None:
        if trim_chunk < 1:
            raise ValueError("trim_chunk must be at least 1")
        self.redis = redis
        self.key = key
        self.maxlen = maxlen
        self.retention = retention
        self.trim_chunk = trim_chunk
        self.prefix = f"{key}:idx:"
        self._write = durable_script(redis, _WRITE, *wait, what="an audit batch")
        self._trim = redis.register_script(_TRIM)
        self._reindex = redis.register_script(_REINDEX)
        self._page = redis.register_script(_PAGE)

    def index_key(self, kind: str, value: str | None = None) -> str:
        """Return the key of one index: kind `t` (all records), or a kind and a value."""
        return self.prefix + kind if value is None else f"{self.prefix}{kind}:{value}"

    async def write(self, lines: list[str]) -> None:
        """Append the lines in order with their index entries, `WRITE_CHUNK` per script
        call (so Redis serves grant checks in between), or raise.

        Each call's marker is named after its lines, which hold their records' unique ids:
        a call sent again (by the client library after a timeout, or by the sink retrying
        a batch of which some calls were written) is a no-op for `_BATCH_TTL` seconds.
        """
        malformed = 0
        for start in range(0, len(lines), WRITE_CHUNK):
            chunk = lines[start : start + WRITE_CHUNK]
            digest = hashlib.sha256("\n".join(chunk).encode("utf-8", "surrogatepass"))
            marker = f"{self.key}:w:{digest.hexdigest()[:32]}"
            done = int(
                await self._write(keys=[self.key, marker], args=[self.prefix, _BATCH_TTL, *chunk])
            )
            malformed += max(done, 0)
        if malformed > 0:
            log.warning(
                "audit store: %d of %d lines were not JSON objects; stored unindexed",
                malformed,
                len(lines),
            )

    async def maintain(self) -> int:
        """Trim entries beyond maxlen and older than retention with their index members."""
        if self.maxlen is None and self.retention is None:
            return 0
        maxlen = -1 if self.maxlen is None else max(self.maxlen, 0)
        retention = -1 if self.retention is None else max(int(self.retention * 1000), 0)
        total = 0
        while True:
            # One chunk per call keeps each script short, so Redis serves others in between;
            # each chunk is atomic, so replicas trimming at once never remove twice.
            removed = int(
                await self._trim(
                    keys=[self.key], args=[self.prefix, maxlen, retention, self.trim_chunk]
                )
            )
            total += removed
            if removed < self.trim_chunk:
                return total

    async def reindex(self, chunk: int = 1000) -> int:
        """Index every entry of the stream again, e.g. one written by an older sink."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        after, total = "", 0
        while True:
            count, last = await self._reindex(keys=[self.key], args=[self.prefix, after, chunk])
            total += int(count)
            if int(count) < chunk:
                return total
            after = _text(last)

    async def close(self) -> None:
        """Leave the Redis client to its owner, who closes it."""
        return None

    async def query(self, q: Query) -> Page:
        """Return one page of the records that match every filter of the query."""
        desc = q.order == "desc"
        after = _parse_cursor(q.cursor, desc)
        if q.since is not None and q.until is not None and q.since >= q.until:
            return Page([], None)
        lo = "-inf" if q.since is None else repr(q.since * 1000 - _SLACK_MS)
        hi = "+inf" if q.until is None else repr(q.until * 1000 + _SLACK_MS)
        keys = await self._choose(q, lo, hi)
        if not keys:
            return Page([], None)
        records: list[Record] = []
        last: Position | None = None
        seen = 0

        def batch() -> int:
            # Read about as many entries as the page still needs at the match rate so far:
            # a filter on top of the index is rarely more than a few times less selective.
            need = q.limit + 1 - len(records)
            if not seen:
                return min(need + 16, _MAX_BATCH)
            rate = max(len(records) / seen, 0.05)
            return max(min(int(need / rate * 1.2) + 16, _MAX_BATCH), 16)

        async with contextlib.aclosing(self._merged(keys, lo, hi, after, desc, batch)) as hits:
            async for score, member, line in hits:
                seen += 1
                rec = _decode(member, line)
                if rec is None or not _matches(rec, q, _effective_ts(rec, member)):
                    continue
                if len(records) == q.limit:
                    # One match past the limit: there is a next page.
                    assert last is not None
                    return Page(records, _cursor(desc, last))
                records.append(rec)
                last = (score, member)
        return Page(records, None)

    async def summary(self, grant_id: str) -> dict[str, Any] | None:
        """Return what happened under a grant: its lifecycle, requests, bytes and resources."""
        out: dict[str, Any] = {
            "grant_id": grant_id,
            "user": None,
            "scope": None,
            "entitlement": None,
            "state": None,
            "reason": None,
            "ticket": None,
            "break_glass": False,
            "approvers": [],
            "events": [],
            "requests": {"allowed": 0, "denied": 0},
            "bytes": 0,
            "first_access": None,
            "last_access": None,
            "resources": [],
            "recordings": [],
        }
        seen = False
        requested: Record | None = None
        resources: dict[tuple[str, str], dict[str, Any]] = {}
        recordings: dict[str, None] = {}
        index = self.index_key("grant", grant_id)
        hits = self._scan(index, "-inf", "+inf", None, False, lambda: _MAX_BATCH)
        async with contextlib.aclosing(hits):
            async for _, member, line in hits:
                rec = _decode(member, line)
                if rec is None or rec.get("grant_id") != grant_id:
                    continue
                seen = True
                event = rec.get("event")
                for name in ("user", "scope"):
                    if out[name] is None and isinstance(rec.get(name), str):
                        out[name] = rec[name]
                if _is_lifecycle(event):
                    out["events"].append({k: rec[k] for k in _STEP_FIELDS if k in rec})
                    requested = _note_lifecycle(out, rec, requested)
                elif event in ACCESS_EVENTS:
                    note_access(out, resources, recordings, rec, _iso(_effective_ts(rec, member)))
        if not seen:
            return None
        _prefer_request(out, requested)
        out["resources"] = list(resources.values())
        out["recordings"] = list(recordings)
        return out

    async def grant_reasons(self, grant_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Return why each grant was given: user, scope, reason, ticket, approvers.

        Read from each grant's lifecycle records; grants with none in the trail are left out.
        """
        ids = [g for g in dict.fromkeys(grant_ids) if isinstance(g, str)]
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for grant_id in ids:
            await self._page(
                keys=[self.index_key("lifecycle", grant_id), self.key],
                args=["-inf", "+inf", _LIFECYCLE_MAX, "0", "", ""],
                client=pipe,
            )
        replies = await pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for grant_id, flat in zip(ids, replies, strict=True):
            why: dict[str, Any] = {
                "user": None, "scope": None, "entitlement": None, "reason": None,
                "ticket": None, "approvers": [], "break_glass": False, "state": None,
            }  # fmt: skip
            found = False
            requested: Record | None = None
            for _, member, line in _triples(flat):
                rec = _decode(member, line)
                if rec is None or rec.get("grant_id") != grant_id:
                    continue
                found = True
                requested = _note_lifecycle(why, rec, requested)
            if found:
                _prefer_request(why, requested)
                out[grant_id] = why
        return out

    async def _choose(self, q: Query, lo: str, hi: str) -> list[str]:
        """Return the index keys to scan: those of the filter with the fewest entries in range."""
        candidates: list[list[str]] = []
        for kind, _ in _INDEXED:
            if (value := getattr(q, kind)) is not None:
                candidates.append([self.index_key(kind, value)])
        if q.events:
            candidates.append([self.index_key("event", e) for e in dict.fromkeys(q.events)])
        if not candidates:
            return [self.index_key("t")]
        pipe = self.redis.pipeline(transaction=False)
        for keys in candidates:
            for key in keys:
                pipe.zcount(key, lo, hi)
        counts = iter(await pipe.execute())
        sizes = [sum(int(next(counts)) for _ in keys) for keys in candidates]
        best = min(range(len(candidates)), key=sizes.__getitem__)  # first of equals: priority
        return candidates[best] if sizes[best] > 0 else []

    async def _merged(
        self,
        keys: list[str],
        lo: str,
        hi: str,
        after: Position | None,
        desc: bool,
        batch: Callable[[], int],
    ) -> AsyncGenerator[Hit, None]:
        """Yield the entries of several indexes in one order (the indexes do not overlap)."""
        if len(keys) == 1:
            async with contextlib.aclosing(self._scan(keys[0], lo, hi, after, desc, batch)) as it:
                async for hit in it:
                    yield hit
            return
        scans = [self._scan(k, lo, hi, after, desc, batch) for k in keys]
        try:
            heap: list[tuple[Any, int, Hit]] = []
            for i, scan in enumerate(scans):
                first = await anext(scan, None)
                if first is not None:
                    heapq.heappush(heap, (_order_key(first, desc), i, first))
            while heap:
                _, i, hit = heapq.heappop(heap)
                yield hit
                following = await anext(scans[i], None)
                if following is not None:
                    heapq.heappush(heap, (_order_key(following, desc), i, following))
        finally:
            for scan in scans:
                await scan.aclose()

    async def _scan(
        self,
        index: str,
        lo: str,
        hi: str,
        after: Position | None,
        desc: bool,
        batch: Callable[[], int],
    ) -> AsyncGenerator[Hit, None]:
        """Yield (score, member, line) of one index in order, strictly after `after`.

        `batch` says how many entries to read in the next call.
        """
        resume = after
        while True:
            size = batch()
            flat = await self._page(
                keys=[index, self.key],
                args=[
                    lo, hi, size, "1" if desc else "0",
                    "" if resume is None else resume[1], "" if resume is None else repr(resume[0]),
                ],
            )  # fmt: skip
            hits = list(_triples(flat))
            for hit in hits:
                position = (hit[0], hit[1])
                # Only a start from a score (the cursor's member is gone, or it is in another
                # index of a merge) returns members up to the cursor again.
                if after is not None and (position >= after if desc else position <= after):
                    continue
                after = position
                yield hit
            if len(hits) < size:
                return
            # The last member read is in this index, so the next call continues by its rank.
            resume = (hits[-1][0], hits[-1][1])


class _Reversed:
    """Order a key the other way round, for merging newest-first scans."""

    __slots__ = ("key",)

    def __init__(self, key: Position) -> None:
        self.key = key

    def __lt__(self, other: _Reversed) -> bool:
        return other.key < self.key


def _order_key(hit: Hit, desc: bool) -> Any:
    position = (hit[0], hit[1])
    return _Reversed(position) if desc else position


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _triples(flat: list[Any]) -> Iterable[Hit]:
    for i in range(0, len(flat), 3):
        yield float(flat[i + 1]), _text(flat[i]), flat[i + 2]


def _member_ms(member: str) -> int:
    return int(member.split("-", 1)[0])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _decode(member: str, line: Any) -> Record | None:
    """Return the record of a line, a stand-in for a malformed line, or None for a gone entry."""
    if line is None:
        return None
    try:
        rec = json.loads(line.decode() if isinstance(line, bytes) else line)
    except ValueError:
        rec = None
    if isinstance(rec, dict):
        return rec
    ts = _member_ms(member) / 1000
    raw = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
    return {"malformed": True, "raw": raw, "ts": ts, "time": _iso(ts)}


def _effective_ts(rec: Record, member: str) -> float:
    """Return the record's ts, or the entry's time where ts is unusable (as the index does)."""
    ts = rec.get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        try:
            value = float(ts)
        except OverflowError:
            value = math.inf
        if math.isfinite(value):
            return value
    return _member_ms(member) / 1000


def _matches(rec: Record, q: Query, ts: float) -> bool:
    for kind, name in _INDEXED:
        if (value := getattr(q, kind)) is not None and rec.get(name) != value:
            return False
    if q.events and rec.get("event") not in q.events:
        return False
    if q.since is not None and ts < q.since:
        return False
    return q.until is None or ts < q.until


def _cursor(desc: bool, position: Position) -> str:
    return f"{'d' if desc else 'a'}:{position[0]!r}:{position[1]}"


def _parse_cursor(cursor: str | None, desc: bool) -> Position | None:
    if cursor is None:
        return None
    try:
        direction, score, member = cursor.split(":", 2)
        value = float(score)
    except ValueError:
        raise ValueError(f"bad cursor {cursor!r}") from None
    if direction != ("d" if desc else "a"):
        raise ValueError("cursor belongs to a query in the other order")
    if math.isnan(value) or not _MEMBER.fullmatch(member):
        raise ValueError(f"bad cursor {cursor!r}")
    return value, member


def _is_lifecycle(event: Any) -> bool:
    return isinstance(event, str) and (event.startswith(_LIFECYCLE_PREFIX) or event == _BREAK_GLASS)


def _note_lifecycle(out: dict[str, Any], rec: Record, requested: Record | None) -> Record | None:
    """Fold one lifecycle record into a summary; return the grant.requested record so far."""
    event = rec.get("event")
    for name in ("user", "scope", "entitlement", "reason", "ticket"):
        if out[name] is None and rec.get(name) is not None:
            out[name] = rec[name]
    if isinstance(rec.get("state"), str):
        out["state"] = rec["state"]
    if event == _BREAK_GLASS or rec.get("break_glass") is True:
        out["break_glass"] = True
    if event == "grant.approved":
        listed = rec.get("approvers")
        names = listed if isinstance(listed, list) else [rec.get("actor")]
        for approver in names:
            if isinstance(approver, str) and approver not in out["approvers"]:
                out["approvers"].append(approver)
    if event == "grant.requested" and requested is None:
        return rec
    return requested


def _prefer_request(out: dict[str, Any], requested: Record | None) -> None:
    """Take user, scope, reason and ticket from the request itself, where it is in the trail."""
    if requested is None:
        return
    for name in ("user", "scope", "reason", "ticket", "entitlement"):
        if requested.get(name) is not None:
            out[name] = requested[name]


def store_for(settings: Settings, redis: Redis) -> AuditStore | None:
    """Return the configured Redis audit trail, or None when `audit.redis` is off."""
    a = settings.audit.redis
    if a is None:
        return None
    key = settings.redis.key_prefix + a.stream
    wait = (settings.redis.wait_replicas, settings.redis.wait_timeout)
    return AuditStore(redis, key, maxlen=a.maxlen, retention=a.retention, wait=wait)
