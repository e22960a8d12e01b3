"""The grant store in Redis: each step of a grant's life is one atomic Lua script.

Keys (after the configured prefix, default `jit:`):
  grant:{id}                 hash, one per request or grant: the fields of grants.Grant
                             (approvals a JSON list of {by, at, comment}; times in epoch
                             seconds, "" while unset). Redis expires it history_ttl after its
                             end (or after pending_until while pending)
  active:{len(user)}:{user}:{scope}
                             sorted set of active grant ids scored by expiry (ms), expiring
                             with the last of them; a check reads these sets in one Lua call
  grants                     sorted set of grant ids made active, scored by expiry (ms); an
                             early end removes the id, an expiry leaves it for history_ttl
                             (a sweeper finds expired grants below now)
  waiting:{len(user)}:{user}:{scope}
                             string: the id of the user's latest request for the scope that
                             waits for approval, expiring at its pending_until; it stops one
                             more from being filed while that request is still pending
  pending                    sorted set of requests made pending, scored by pending_until (ms);
                             approve and deny remove the id, a lapse leaves it for history_ttl
  history                    sorted set of every retained record, scored by when Redis
                             expires its hash (ms)
  unreviewed                 sorted set of break-glass grants made active and not yet reviewed,
                             scored like history; a review removes the id
  notified:{kind}:{id}       string set once (SET NX) by the replica that sends a notice,
                             e.g. kind "expiring"; expires by itself
  events                     pub/sub channel: "revoked {id}" (revoked or relinquished),
                             "extended {id}" and "granted {id}" (made active) reach every
                             replica at once
The index sets expire by themselves after their last entry. Every change is one Lua script
(a batch check is one pipeline), so concurrent changes never leave a broken state.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import Any

from redis.asyncio import Redis

from . import lua
from .grants import HISTORY_TTL, STATES, Approval, Grant, GrantError
from .redisd import quiet_probe
from .redisha import ASK_EVERY, durable_script, master_moved

# The scripts (proxy/lua/grant_*.lua, each saying its KEYS and ARGV).
_CHECK = lua.read("grant_check")
_LIB = lua.read("grants_lib")  # shared by every transition
_CREATE = lua.compose("grant_create", _LIB)
_APPROVE = lua.compose("grant_approve", _LIB)
_END = lua.compose("grant_end", _LIB)
_EXTEND = lua.compose("grant_extend", _LIB)
_REQUEST_EXTENSION = lua.compose("grant_request_extension", _LIB)
_SWEEP = lua.compose("grant_sweep", _LIB)
_REVIEW = lua.compose("grant_review", _LIB)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: str | None) -> float:
    return float(value) if value else 0.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _secs(millis: int) -> str:
    return f"{millis / 1000:.3f}"


def _grant(fields: dict[Any, Any] | list[Any], now_ms: int) -> Grant:
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    f = {_text(k): _text(v) for k, v in fields.items()}
    expires_at, pending_until = _num(f.get("expires_at")), _num(f.get("pending_until"))
    state = f.get("state") or "active"
    if state == "active" and round(expires_at * 1000) <= now_ms:
        state = "expired"
    elif state == "pending" and round(pending_until * 1000) <= now_ms:
        state = "lapsed"
    approvals = tuple(
        Approval(str(a["by"]), float(a["at"]), str(a.get("comment", "")))
        for a in json.loads(f.get("approvals") or "[]")
    )
    created_at = _num(f.get("created_at"))
    return Grant(
        id=f["id"],
        user=f["user"],
        scope=f["scope"],
        created_at=created_at,
        expires_at=expires_at,
        reason=f.get("reason", ""),
        granted_by=f.get("granted_by", ""),
        state=state,
        ticket=f.get("ticket", ""),
        entitlement=f.get("entitlement", ""),
        duration=_num(f.get("duration")) or max(0.0, expires_at - created_at),
        needed=int(f.get("needed") or 0),
        approvals=approvals,
        pending_until=pending_until,
        activated_at=_num(f.get("activated_at")) or (created_at if "state" not in f else 0.0),
        ended_at=_num(f.get("ended_at")),
        ended_by=f.get("ended_by", ""),
        end_comment=f.get("end_comment", ""),
        break_glass=f.get("break_glass") == "1",
        extensions=int(f.get("extensions") or 0),
        extended_by=f.get("extended_by", ""),
        reviewed_by=f.get("reviewed_by", ""),
        reviewed_at=_num(f.get("reviewed_at")),
        review_comment=f.get("review_comment", ""),
        kind=f.get("kind") or "grant",
        extends=f.get("extends", ""),
        max_total=_num(f.get("max_total")),
        extension_request=f.get("extension_request", ""),
    )


def _outcome(reply: list[Any]) -> tuple[Grant, str]:
    status, detail, *fields = reply
    if _text(status) != "ok":
        raise GrantError(
            _text(status), _text(detail), _grant(fields, _now_ms()) if fields else None
        )
    return _grant(fields, _now_ms()), _text(detail)


def _blank(grant_id: str, now: float) -> dict[str, str]:
    """Return a new record's fields, every one of them unset."""
    return {
        "id": grant_id,
        "kind": "grant",
        "user": "",
        "scope": "",
        "reason": "",
        "ticket": "",
        "entitlement": "",
        "duration": "",
        "needed": "0",
        "approvals": "[]",
        "created_at": f"{now:.6f}",  # finer than ms, so newest-first is a strict order
        "pending_until": "",
        "activated_at": "",
        "expires_at": "",
        "ended_at": "",
        "ended_by": "",
        "end_comment": "",
        "granted_by": "",
        "break_glass": "0",
        "extensions": "0",
        "extended_by": "",
        "reviewed_by": "",
        "reviewed_at": "",
        "review_comment": "",
        "extends": "",
        "max_total": "",
        "extension_request": "",
    }


class RedisGrants:
    """The grant store, on one Redis connection pool shared by every request."""

    def __init__(
        self,
        redis: Redis,
        prefix: str = "jit:",
        *,
        history_ttl: float = HISTORY_TTL,
        wait: tuple[int, float] = (0, 0.0),  # WAIT (replicas, seconds) after each change
    ) -> None:
        if history_ttl <= 0:
            raise ValueError("history_ttl must be positive")
        self.redis = redis
        self.prefix = prefix
        self.history_ttl = history_ttl
        self._keep_ms = round(history_ttl * 1000)
        self._index = prefix + "grants"
        self._pending = prefix + "pending"
        self._history = prefix + "history"
        self._unreviewed = prefix + "unreviewed"
        self.channel = prefix + "events"
        self._check = redis.register_script(_CHECK)
        self._create = durable_script(redis, _CREATE, *wait)
        self._approve = durable_script(redis, _APPROVE, *wait)
        self._end = durable_script(redis, _END, *wait)
        self._extend = durable_script(redis, _EXTEND, *wait)
        self._request_extension = durable_script(redis, _REQUEST_EXTENSION, *wait)
        self._review = durable_script(redis, _REVIEW, *wait)
        self._sweep = redis.register_script(_SWEEP)

    def _active_key(self, user: str, scope: str) -> str:
        # The length prefix keeps user and scope apart whatever characters they hold.
        return f"{self.prefix}active:{len(user.encode())}:{user}:{scope}"

    def _grant_key(self, grant_id: str) -> str:
        return f"{self.prefix}grant:{grant_id}"

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        """Return (id, expiry) of an active grant covering any of the scopes; one round trip."""
        keys = [self._active_key(user, scope) for scope in scopes]
        found = await self._check(keys=keys, args=[_now_ms()])
        return (_text(found[0]), int(found[1]) / 1000) if found else None

    async def check_many(self, user: str, groups: Iterable[tuple[str, ...]]) -> list[str | None]:
        """Per group of scopes, the id of an active grant covering any; one round trip."""
        now, key = [_now_ms()], self._active_key
        async with self.redis.pipeline(transaction=False) as pipe:
            for scopes in groups:
                await self._check(keys=[key(user, s) for s in scopes], args=now, client=pipe)
            return [_text(found[0]) if found else None for found in await pipe.execute()]

    async def entitlements(self, grant_ids: list[str]) -> dict[str, str]:
        """The entitlement of each grant that still exists, by id; one round trip in all."""
        return {g.id: g.entitlement for g in await self._fetch(grant_ids, _now_ms())}

    async def add(self, user: str, scope: str, ttl: float, reason: str, granted_by: str) -> Grant:
        """Create an active grant (an admin's) that Redis expires by itself after ttl seconds."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        return await self._new(user, scope, ttl, reason, granted_by=granted_by)

    async def request(
        self,
        user: str,
        scope: str,
        *,
        duration: float,
        reason: str,
        ticket: str | None = None,
        entitlement: str = "",
        needed: int = 0,
        pending_ttl: float = 86400.0,
        break_glass: bool = False,
    ) -> Grant:
        """File a request: active at once if it needs no approval, else pending for pending_ttl."""
        if duration <= 0:
            raise ValueError("duration must be positive")
        if needed < 0:
            raise ValueError("needed must not be negative")
        if needed and pending_ttl <= 0:
            raise ValueError("pending_ttl must be positive")
        return await self._new(
            user,
            scope,
            duration,
            reason,
            ticket=ticket or "",
            entitlement=entitlement,
            needed=needed,
            pending_ttl=pending_ttl,
            break_glass=break_glass,
        )

    async def _new(
        self,
        user: str,
        scope: str,
        duration: float,
        reason: str,
        *,
        granted_by: str = "",
        ticket: str = "",
        entitlement: str = "",
        needed: int = 0,
        pending_ttl: float = 0.0,
        break_glass: bool = False,
    ) -> Grant:
        if not user or not scope:
            raise ValueError("user and scope are required")
        now = time.time()
        now_ms = int(now * 1000)
        grant_id = "g-" + secrets.token_hex(8)
        fields = _blank(grant_id, now) | {
            "user": user,
            "scope": scope,
            "reason": reason,
            "ticket": ticket,
            "entitlement": entitlement,
            "duration": repr(float(duration)),
            "needed": str(needed),
            "granted_by": granted_by,
            "break_glass": "1" if break_glass else "0",
        }
        if needed:
            deadline = now_ms + round(pending_ttl * 1000)
            fields |= {"state": "pending", "pending_until": _secs(deadline)}
        else:
            deadline = now_ms + round(duration * 1000)
            fields |= {
                "state": "active",
                "activated_at": _secs(now_ms),
                "expires_at": _secs(deadline),
            }
        flat = [item for pair in fields.items() for item in pair]
        keys = [
            self._grant_key(grant_id),
            self._active_key(user, scope),
            self._index,
            self._pending,
            self._history,
            self._unreviewed,
            self.channel,
        ]
        if needed:
            keys.append(f"{self.prefix}waiting:{len(user.encode())}:{user}:{scope}")
        reply = await self._create(
            keys=keys, args=[now_ms, self._keep_ms, grant_id, deadline, *flat]
        )
        return _outcome(reply)[0]

    async def approve(self, grant_id: str, approver: str, comment: str = "") -> tuple[Grant, bool]:
        """Record one approval; return the record and whether this approval completed it.

        The last approval a request needs activates it; the last one an extension request
        needs applies it to its grant (state "applied"). An extension request whose grant is
        no longer active ends lapsed instead: GrantError not_active (or exceeds_max when the
        grant already lasts its maximum), with the lapsed request as `grant`.
        """
        reply = await self._approve(
            keys=[
                self._grant_key(grant_id),
                self._index,
                self._pending,
                self._history,
                self._unreviewed,
                self.channel,
            ],
            args=[self.prefix, _now_ms(), self._keep_ms, grant_id, approver, comment],
        )
        grant, activated = _outcome(reply)
        return grant, activated == "1"

    async def deny(self, grant_id: str, by: str, comment: str = "") -> Grant:
        """End a pending request unapproved (by == its user: the requester withdrew it)."""
        return await self._finish("deny", grant_id, by, comment)

    async def revoke(self, grant_id: str, by: str = "", comment: str = "") -> Grant | None:
        """End an active grant at once, on every replica; None if it was not active."""
        try:
            return await self._finish("revoke", grant_id, by, comment)
        except GrantError:
            return None

    async def relinquish(self, grant_id: str, user: str, comment: str = "") -> Grant:
        """End one's own active grant early, on every replica."""
        return await self._finish("relinquish", grant_id, user, comment)

    async def _finish(self, verb: str, grant_id: str, by: str, comment: str) -> Grant:
        keys = [self._grant_key(grant_id), self._index, self._pending, self._history]
        reply = await self._end(
            keys=[*keys, self.channel, self._unreviewed],
            args=[self.prefix, _now_ms(), self._keep_ms, grant_id, by, comment, verb],
        )
        return _outcome(reply)[0]

    async def extend(self, grant_id: str, by: str, extra_seconds: float, max_total: float) -> Grant:
        """Move an active grant's expiry later, keeping activation-to-expiry within max_total."""
        if extra_seconds <= 0:
            raise ValueError("extra_seconds must be positive")
        reply = await self._extend(
            keys=[
                self._grant_key(grant_id),
                self._index,
                self._history,
                self.channel,
                self._unreviewed,
            ],
            args=[
                self.prefix,
                _now_ms(),
                self._keep_ms,
                grant_id,
                by,
                round(extra_seconds * 1000),
                round(max_total * 1000),
            ],
        )
        return _outcome(reply)[0]

    async def request_extension(
        self,
        grant_id: str,
        user: str,
        extra_seconds: float,
        max_total: float,
        *,
        needed: int,
        pending_ttl: float,
        comment: str = "",
    ) -> Grant:
        """File a request, pending `needed` approvals, to lengthen an active grant of the user's.

        Refused unless the grant is active, held by `user`, has no extension request pending,
        and would not last longer than max_total seconds from its activation with the extra.
        """
        if extra_seconds <= 0:
            raise ValueError("extra_seconds must be positive")
        if needed < 1:
            raise ValueError("an extension request needs at least one approval")
        if pending_ttl <= 0:
            raise ValueError("pending_ttl must be positive")
        now = time.time()
        now_ms = int(now * 1000)
        request_id = "g-" + secrets.token_hex(8)
        deadline = now_ms + round(pending_ttl * 1000)
        fields = _blank(request_id, now) | {
            "kind": "extension",
            "extends": grant_id,
            "state": "pending",
            "duration": repr(float(extra_seconds)),
            "needed": str(needed),
            "pending_until": _secs(deadline),
            "max_total": repr(float(max_total)),
        }
        flat = [item for pair in fields.items() for item in pair]
        reply = await self._request_extension(
            keys=[
                self._grant_key(request_id),
                self._grant_key(grant_id),
                self._pending,
                self._history,
            ],
            args=[
                self.prefix,
                now_ms,
                self._keep_ms,
                request_id,
                grant_id,
                user,
                round(extra_seconds * 1000),
                round(max_total * 1000),
                deadline,
                comment,
                *flat,
            ],
        )
        return _outcome(reply)[0]

    async def review(self, grant_id: str, by: str, comment: str = "") -> Grant:
        """Record the follow-up review of break-glass access, once, by someone not its holder."""
        reply = await self._review(
            keys=[self._grant_key(grant_id), self._unreviewed],
            args=[_now_ms(), grant_id, by, comment],
        )
        return _outcome(reply)[0]

    async def list_unreviewed(self) -> list[Grant]:
        """Return break-glass grants that gave access and await review, oldest first."""
        now_ms = _now_ms()
        ids = await self.redis.zrange(self._unreviewed, now_ms + 1, "+inf", byscore=True)
        found = [g for g in await self._fetch(ids, now_ms) if g.break_glass and not g.reviewed_by]
        return sorted(found, key=lambda g: g.created_at)

    async def expiring_between(self, start: float, end: float) -> list[Grant]:
        """Return active grants whose expiry lies in (start, end], soonest first."""
        now_ms = _now_ms()
        low, high = round(start * 1000), round(end * 1000)
        ids = await self.redis.zrange(self._index, low + 1, high, byscore=True)
        found = [
            g
            for g in await self._fetch(ids, now_ms)
            if g.state == "active" and low < round(g.expires_at * 1000) <= high
        ]
        return sorted(found, key=lambda g: g.expires_at)

    async def claim_notices(self, kind: str, items: Iterable[tuple[str, float]]) -> list[bool]:
        """Mark (grant id, seconds to keep) as notified; True where this call set the mark."""
        items = [*items]
        if not items:
            return []
        # SET NX: of all the replicas that see a grant, exactly one wins and sends the notice.
        pipe = self.redis.pipeline(transaction=False)
        for grant_id, keep in items:
            key = f"{self.prefix}notified:{kind}:{grant_id}"
            pipe.set(key, "1", nx=True, px=max(1, round(keep * 1000)))
        return [bool(done) for done in await pipe.execute()]

    async def get(self, grant_id: str) -> Grant | None:
        fields = await self.redis.hgetall(self._grant_key(grant_id))
        return _grant(fields, _now_ms()) if fields else None

    async def list_pending(self, user: str | None = None) -> list[Grant]:
        """Return the requests still awaiting approval, oldest first."""
        now_ms = _now_ms()
        ids = await self.redis.zrange(self._pending, now_ms + 1, "+inf", byscore=True)
        grants = await self._fetch(ids, now_ms)
        found = [g for g in grants if g.state == "pending" and (user is None or g.user == user)]
        return sorted(found, key=lambda g: g.created_at)

    async def _fetch(self, ids: Iterable[Any], now_ms: int) -> list[Grant]:
        keys = [self._grant_key(_text(grant_id)) for grant_id in ids]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [_grant(f, now_ms) for f in await pipe.execute() if f]

    async def expires_at(self, grant_id: str) -> float | None:
        """Return an active grant's expiry (past once expired), or None if it has ended."""
        state, value = await self.redis.hmget(self._grant_key(grant_id), ["state", "expires_at"])
        if value is None or (state is not None and _text(state) != "active"):
            return None
        return float(_text(value))

    async def events(
        self,
        ping_every: float = 5.0,
        *,
        watch: Callable[[Callable[[], bool]], None] | None = None,
    ) -> AsyncIterator[tuple[str, str]]:
        """Yield ("subscribed", "") once subscribed, then every change announced on the
        channel as (kind, grant id): "revoked", "extended", "granted". The feed is pinged
        every `ping_every` seconds; ("heard", t) says the ping sent at monotonic time t was
        answered, so every change announced before t has been yielded. A dead feed raises.

        Once subscribed, `watch` is given a function that says whether everything the
        subscription received has been yielded: nothing unread in its buffer or its socket,
        and no end of stream pending (a Redis that just died). It says False when unsure.
        """
        pubsub = self.redis.pubsub()
        peek: socket.socket | None = None
        try:
            await pubsub.subscribe(self.channel)
            # redis-py reconnects and subscribes again by itself after a dropped connection;
            # what was announced meanwhile is lost, so a new connection ends this feed.
            first = getattr(pubsub.connection, "_reader", None)
            if watch is not None:
                peek, quiet = quiet_probe(pubsub)
                watch(quiet)
            yield "subscribed", ""
            sent = asked = -ping_every
            while True:
                if time.monotonic() - sent >= ping_every:
                    sent = time.monotonic()
                    await pubsub.ping(repr(sent))
                if time.monotonic() - asked >= ASK_EVERY:  # failed over: end
                    asked = time.monotonic()
                    if await master_moved(pubsub):
                        raise ConnectionError("the Redis master moved: announcements missed")
                wait = max(0.0, min(sent + ping_every, asked + ASK_EVERY) - time.monotonic())
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if getattr(pubsub.connection, "_reader", None) is not first:
                    raise ConnectionError("the event feed reconnected: announcements missed")
                if msg is None:
                    continue
                if msg.get("type") == "message":
                    kind, _, grant_id = _text(msg["data"]).partition(" ")
                    yield kind, grant_id
                elif msg.get("type") == "pong":
                    yield "heard", _text(msg["data"])
        finally:
            if peek is not None:
                peek.close()
            await pubsub.aclose()

    async def revocations(self, ping_every: float = 5.0) -> AsyncIterator[str | None]:
        """Yield None once subscribed, then the id of every grant ended early on any replica."""
        async for kind, grant_id in self.events(ping_every):
            if kind == "subscribed":
                yield None
            elif kind == "revoked":
                yield grant_id

    async def count_active(self) -> int:
        return int(await self.redis.zcount(self._index, _now_ms() + 1, "+inf"))

    async def sweep(self, limit: int = 500) -> list[Grant]:
        """Mark grants that expired and requests that lapsed since the last sweep (once)."""
        now_ms = _now_ms()
        out = await self._sweep(
            keys=[self._index, self._pending, self.prefix + "swept"],
            args=[self.prefix, now_ms, limit],
        )
        return await self._fetch(out[1::2], now_ms)

    # Last: below it, `list` in annotations would name this method, not the builtin.
    async def list(
        self, user: str | None = None, states: Collection[str] | None = ("active",)
    ) -> list[Grant]:
        """Return retained records in the given states (None: every state), newest first."""
        wanted = None if states is None else frozenset(states)
        if wanted is not None and not wanted <= set(STATES):
            raise ValueError(f"unknown state in {sorted(wanted)}; states are {', '.join(STATES)}")
        now_ms = _now_ms()
        index = self._index if wanted is not None and wanted <= {"active"} else self._history
        grants = await self._fetch(
            await self.redis.zrange(index, now_ms + 1, "+inf", byscore=True), now_ms
        )
        found = [
            g
            for g in grants
            if (user is None or g.user == user) and (wanted is None or g.state in wanted)
        ]
        return sorted(found, key=lambda g: g.created_at, reverse=True)
