"""Time-limited grants in Redis.

Keys (after the configured prefix, default `jit:`):
  grant:{id}                 hash with the grant's fields; Redis expires it at the grant's end
  active:{len(user)}:{user}:{scope}
                             sorted set of grant ids scored by expiry (ms), expiring with the
                             last of them; a check reads these sets in one Lua call
  grants                     sorted set of every grant id scored by expiry (ms), for listing
  events                     pub/sub channel: "revoked {id}" reaches every replica at once
Every change is a Lua script, so it is atomic.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

# KEYS: the active sets of every covering scope, narrowest first. ARGV: now (ms).
# Returns {id, expiry ms} of the longest-lived grant of the narrowest scope that has one.
_CHECK = """
local since = '(' .. ARGV[1]
for _, key in ipairs(KEYS) do
  local found = redis.call('ZREVRANGEBYSCORE', key, '+inf', since, 'WITHSCORES', 'LIMIT', 0, 1)
  if found[1] then return found end
end
return false
"""

_ADD = """
local grant, active, index = KEYS[1], KEYS[2], KEYS[3]
local now_ms, exp_ms, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('HSET', grant, unpack(ARGV, 4))
redis.call('PEXPIREAT', grant, exp_ms)
redis.call('ZREMRANGEBYSCORE', active, '-inf', now_ms)
redis.call('ZADD', active, exp_ms, id)
local last = redis.call('ZRANGE', active, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', active, tonumber(last[2]))
redis.call('ZREMRANGEBYSCORE', index, '-inf', now_ms)
redis.call('ZADD', index, exp_ms, id)
return 1
"""

# KEYS: grant hash, grants index, events channel. ARGV: key prefix, id.
# Returns the revoked grant's fields, and tells every replica (pub/sub) in the same step.
_REVOKE = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {} end
local g = {}
for i = 1, #fields, 2 do g[fields[i]] = fields[i + 1] end
local active = ARGV[1] .. 'active:' .. string.len(g.user) .. ':' .. g.user .. ':' .. g.scope
redis.call('ZREM', active, ARGV[2])
if redis.call('ZCARD', active) == 0 then redis.call('DEL', active) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], 'revoked ' .. ARGV[2])
return fields
"""


@dataclass(frozen=True)
class Grant:
    id: str
    user: str
    scope: str
    created_at: float
    expires_at: float
    reason: str
    granted_by: str

    def remaining(self, now: float | None = None) -> float:
        return max(0.0, self.expires_at - (time.time() if now is None else now))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GrantStore(Protocol):
    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None: ...

    async def add(
        self, user: str, scope: str, ttl: float, reason: str, granted_by: str
    ) -> Grant: ...

    async def revoke(self, grant_id: str) -> Grant | None: ...

    async def get(self, grant_id: str) -> Grant | None: ...

    async def list(self, user: str | None = None) -> list[Grant]: ...

    async def count_active(self) -> int: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _grant(fields: dict[Any, Any] | list[Any]) -> Grant:
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    f = {_text(k): _text(v) for k, v in fields.items()}
    return Grant(
        id=f["id"],
        user=f["user"],
        scope=f["scope"],
        created_at=float(f["created_at"]),
        expires_at=float(f["expires_at"]),
        reason=f.get("reason", ""),
        granted_by=f.get("granted_by", ""),
    )


class RedisGrants:
    """The grant store, on one Redis connection pool shared by every request."""

    def __init__(self, redis: Redis, prefix: str = "jit:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._index = prefix + "grants"
        self.channel = prefix + "events"
        self._check = redis.register_script(_CHECK)
        self._add = redis.register_script(_ADD)
        self._revoke = redis.register_script(_REVOKE)

    def _active_key(self, user: str, scope: str) -> str:
        # The length prefix keeps user and scope apart whatever characters they hold.
        return f"{self.prefix}active:{len(user.encode())}:{user}:{scope}"

    def _grant_key(self, grant_id: str) -> str:
        return f"{self.prefix}grant:{grant_id}"

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        """Return (id, expiry) of an active grant covering any of the scopes; one round trip."""
        keys = [self._active_key(user, scope) for scope in scopes]
        found = await self._check(keys=keys, args=[int(time.time() * 1000)])
        return (_text(found[0]), int(found[1]) / 1000) if found else None

    async def add(self, user: str, scope: str, ttl: float, reason: str, granted_by: str) -> Grant:
        """Create a grant that Redis expires by itself after ttl seconds."""
        if not user or not scope:
            raise ValueError("user and scope are required")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        now = time.time()
        grant = Grant(
            id="g-" + secrets.token_hex(8),
            user=user,
            scope=scope,
            created_at=round(now, 3),
            expires_at=round(now + ttl, 3),
            reason=reason,
            granted_by=granted_by,
        )
        fields: list[str] = []
        for key, value in grant.to_dict().items():
            fields += [key, str(value)]
        await self._add(
            keys=[self._grant_key(grant.id), self._active_key(user, scope), self._index],
            args=[int(now * 1000), int(grant.expires_at * 1000), grant.id, *fields],
        )
        return grant

    async def revoke(self, grant_id: str) -> Grant | None:
        """Delete a grant at once; return it, or None if it was not active."""
        fields = await self._revoke(
            keys=[self._grant_key(grant_id), self._index, self.channel],
            args=[self.prefix, grant_id],
        )
        return _grant(fields) if fields else None

    async def get(self, grant_id: str) -> Grant | None:
        fields = await self.redis.hgetall(self._grant_key(grant_id))
        return _grant(fields) if fields else None

    async def list(self, user: str | None = None) -> list[Grant]:
        """Return active grants, soonest expiry first, optionally for one user."""
        now_ms = int(time.time() * 1000)
        ids = await self.redis.zrange(self._index, now_ms + 1, "+inf", byscore=True)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for grant_id in ids:
            pipe.hgetall(self._grant_key(_text(grant_id)))
        grants = [_grant(f) for f in await pipe.execute() if f]
        return [g for g in grants if user is None or g.user == user]

    async def expires_at(self, grant_id: str) -> float | None:
        """Return a grant's expiry, or None once it has ended (expired keys read as gone)."""
        value = await self.redis.hget(self._grant_key(grant_id), "expires_at")
        return float(_text(value)) if value is not None else None

    async def revocations(self, ping_every: float = 5.0) -> AsyncIterator[str | None]:
        """Yield None once subscribed, then the id of every grant revoked on any replica."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            yield None
            last_ping = time.monotonic()
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None and msg.get("type") == "message":
                    kind, _, grant_id = _text(msg["data"]).partition(" ")
                    if kind == "revoked":
                        yield grant_id
                if time.monotonic() - last_ping > ping_every:
                    # A silent feed may be a dead one: a ping on it raises if so.
                    await pubsub.ping()
                    last_ping = time.monotonic()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def count_active(self) -> int:
        return int(await self.redis.zcount(self._index, int(time.time() * 1000) + 1, "+inf"))
