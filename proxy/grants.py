"""Grants in Redis: requested, approved, held for a limited time, ended; each step atomic.

A record goes pending -> active | denied | lapsed, and active -> expired | revoked |
relinquished. Expired and lapsed are derived on read from a passed deadline, so no writer
is needed for them. Access is decided only by the `active:` sets, which Redis expires by
itself at the grant's end; the record outlives the grant by `history_ttl` for history.

An extension request (kind "extension") is a pending record of its own that lengthens an
active grant (`extends`) by `duration` seconds once approved: pending -> applied | denied |
lapsed. The approval that completes it moves the grant's expiry in the same script, never
past `max_total` seconds from the grant's activation; if the grant is no longer active by
then (or already lasts its maximum), that approval ends the request lapsed instead and the
grant is left as it was. A grant has at most one extension request pending.

Keys (after the configured prefix, default `jit:`):
  grant:{id}                 hash, one per request or grant: id, user, scope, state, reason,
                             ticket, entitlement, duration, needed, approvals (JSON list of
                             {by, at, comment}), created_at, pending_until, activated_at,
                             expires_at, ended_at, ended_by, end_comment, granted_by,
                             break_glass, extensions, extended_by, reviewed_by, reviewed_at,
                             review_comment, kind ("grant" or "extension"), extends and
                             max_total (an extension request's grant and the longest total it
                             may give it), extension_request (a grant's latest extension
                             request); times in epoch seconds, "" while unset. Redis expires
                             it history_ttl after its end (or after pending_until while
                             pending)
  active:{len(user)}:{user}:{scope}
                             sorted set of active grant ids scored by expiry (ms), expiring
                             with the last of them; a check reads these sets in one Lua call
  grants                     sorted set of grant ids made active, scored by expiry (ms); an
                             early end removes the id, an expiry leaves it for history_ttl
                             (a sweeper finds expired grants below now)
  pending                    sorted set of requests made pending, scored by pending_until (ms);
                             approve and deny remove the id, a lapse leaves it for history_ttl
  history                    sorted set of every retained record, scored by when Redis
                             expires its hash (ms)
  unreviewed                 sorted set of break-glass grants made active and not yet reviewed,
                             scored like history; a review removes the id
  notified:{kind}:{id}       string set once (SET NX) by the replica that sends a notice,
                             e.g. kind "expiring"; expires by itself
  events                     pub/sub channel: "revoked {id}" (revoked or relinquished) and
                             "extended {id}" reach every replica at once
The index sets expire by themselves after their last entry. Every change is one Lua script,
so concurrent approvals, revocations and extensions can never leave a doubled or broken state.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

STATES = (
    "pending", "active", "denied", "lapsed", "expired", "revoked", "relinquished", "applied",
)  # fmt: skip
HISTORY_TTL = 7 * 86400.0

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

# Shared by every transition. Each returns {status, detail, field, value, ...}: status "ok"
# and the record as it now is, or an error code and message (nothing written).
_LIB = """
local function ms(seconds) return math.floor(tonumber(seconds) * 1000 + 0.5) end
local function secs(millis) return string.format('%.3f', millis / 1000) end

-- The record as a table, with a passed deadline deciding the state; nil if there is none.
local function load(rec, now)
  local raw = redis.call('HGETALL', rec)
  if #raw == 0 then return nil end
  local g = {}
  for i = 1, #raw, 2 do g[raw[i]] = raw[i + 1] end
  if not g.state then g.state = 'active' end  -- written before the lifecycle existed
  if (g.activated_at or '') == '' then g.activated_at = g.created_at end
  if g.state == 'active' and ms(g.expires_at) <= now then g.state = 'expired' end
  if g.state == 'pending' and ms(g.pending_until) <= now then g.state = 'lapsed' end
  return g
end

-- Score id by a deadline, drop entries at or before `stale`, and let Redis expire the
-- whole set `linger` ms after its last deadline.
local function index(key, score, id, stale, linger)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', stale)
  redis.call('ZADD', key, score, id)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, tonumber(last[2]) + linger)
end

local function retain(rec, history, id, until_ms, now)
  redis.call('PEXPIREAT', rec, until_ms)
  index(history, until_ms, id, now, 0)
end

-- A break-glass grant awaiting review stays listed exactly as long as its record lives.
local function follow(unreviewed, id, until_ms, now)
  if redis.call('ZSCORE', unreviewed, id) then index(unreviewed, until_ms, id, now, 0) end
end

local function active_key(prefix, g)
  return prefix .. 'active:' .. string.len(g.user) .. ':' .. g.user .. ':' .. g.scope
end

local function activate(prefix, g, id, exp, now, grants, keep)
  index(active_key(prefix, g), exp, id, now, 0)
  index(grants, exp, id, now - keep, keep)
end

local function reply(rec, status, detail)
  local out = {status, detail}
  for _, v in ipairs(redis.call('HGETALL', rec)) do out[#out + 1] = v end
  return out
end

-- An error if moving g's expiry to exp (ms) would make it last longer than most ms.
local function too_long(g, exp, most)
  local total = exp - ms(g.activated_at)
  if total > most then
    return {'exceeds_max', string.format('a total of %gs exceeds the maximum of %gs',
      total / 1000, most / 1000)}
  end
  return nil
end

local function missing(id) return {'not_found', 'no grant ' .. id} end
local function wrong(id, state, wanted)
  return {'not_' .. wanted, 'grant ' .. id .. ' is ' .. state .. ', not ' .. wanted}
end
"""

# KEYS: record, its active set, grants, pending, history, unreviewed.
# ARGV: now ms, history ms, id, deadline ms (expiry if active, else pending_until), fields.
_CREATE = (
    _LIB
    + """
local rec, id = KEYS[1], ARGV[3]
local now, keep, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if redis.call('EXISTS', rec) == 1 then return {'exists', 'grant ' .. id .. ' exists'} end
redis.call('HSET', rec, unpack(ARGV, 5))
if redis.call('HGET', rec, 'state') == 'active' then
  index(KEYS[2], deadline, id, now, 0)
  index(KEYS[3], deadline, id, now - keep, keep)
  if redis.call('HGET', rec, 'break_glass') == '1' then
    index(KEYS[6], deadline + keep, id, now, 0)
  end
else
  index(KEYS[4], deadline, id, now - keep, keep)
end
retain(rec, KEYS[5], id, deadline + keep, now)
return reply(rec, 'ok', '')
"""
)

# KEYS: record, grants, pending, history, unreviewed, events channel. ARGV: prefix, now ms,
# history ms, id, approver, comment. Detail "1" when this approval activated the grant (its
# clock starts now) or applied the extension request (its grant's expiry moved, announced on
# the channel). An extension request whose grant is no longer active, or already lasts its
# maximum, ends lapsed with this approval: the reply is then an error code and message
# followed by the request as it now is, and its grant is left untouched.
_APPROVE = (
    _LIB
    + """
local rec, prefix, id, by = KEYS[1], ARGV[1], ARGV[4], ARGV[5]
local now, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local g = load(rec, now)
if not g then return missing(id) end
if g.state ~= 'pending' then return wrong(id, g.state, 'pending') end
if by == g.user then return {'self_approval', 'cannot approve your own request'} end
local approvals = cjson.decode(g.approvals)
for _, a in ipairs(approvals) do
  if a.by == by then return {'duplicate_approval', 'already approved by ' .. by} end
end

local function moot(code, message)
  redis.call('HSET', rec, 'state', 'lapsed', 'ended_at', secs(now), 'ended_by', by,
    'end_comment', message)
  redis.call('ZREM', KEYS[3], id)
  retain(rec, KEYS[4], id, now + keep, now)
  return reply(rec, code, message)
end

local parent, prec
if g.kind == 'extension' then
  prec = prefix .. 'grant:' .. g.extends
  parent = load(prec, now)
  if not parent then
    return moot('not_active', 'grant ' .. g.extends .. ' no longer exists; extension ' .. id ..
      ' was not applied')
  end
  if parent.state ~= 'active' then
    return moot('not_active', 'grant ' .. g.extends .. ' is ' .. parent.state ..
      ', not active; extension ' .. id .. ' was not applied')
  end
end

table.insert(approvals, {by = by, at = now / 1000, comment = ARGV[6]})
redis.call('HSET', rec, 'approvals', cjson.encode(approvals))
if #approvals < tonumber(g.needed) then return reply(rec, 'ok', '0') end
local names = {}
for _, a in ipairs(approvals) do names[#names + 1] = a.by end
names = table.concat(names, ',')

if parent then
  -- Lengthen the grant, never past the longest total recorded when the request was made.
  local was = ms(parent.expires_at)
  local exp = math.min(was + ms(g.duration), ms(parent.activated_at) + ms(g.max_total))
  if exp <= was then
    return moot('exceeds_max', string.format(
      'grant %s already lasts its maximum of %gs; extension %s was not applied',
      g.extends, ms(g.max_total) / 1000, id))
  end
  redis.call('HSET', prec, 'expires_at', secs(exp), 'extended_by', names)
  redis.call('HINCRBY', prec, 'extensions', 1)
  activate(prefix, parent, g.extends, exp, now, KEYS[2], keep)
  retain(prec, KEYS[4], g.extends, exp + keep, now)
  follow(KEYS[5], g.extends, exp + keep, now)
  redis.call('PUBLISH', KEYS[6], 'extended ' .. g.extends)
  redis.call('HSET', rec, 'state', 'applied', 'activated_at', secs(now), 'expires_at', secs(exp),
    'granted_by', names)
  redis.call('ZREM', KEYS[3], id)
  retain(rec, KEYS[4], id, now + keep, now)
  return reply(rec, 'ok', '1')
end

local exp = now + ms(g.duration)
redis.call('HSET', rec, 'state', 'active', 'activated_at', secs(now), 'expires_at', secs(exp),
  'granted_by', names)
redis.call('ZREM', KEYS[3], id)
activate(prefix, g, id, exp, now, KEYS[2], keep)
retain(rec, KEYS[4], id, exp + keep, now)
if g.break_glass == '1' then index(KEYS[5], exp + keep, id, now, 0) end
return reply(rec, 'ok', '1')
"""
)

# KEYS: record, grants, pending, history, events channel, unreviewed. ARGV: prefix, now ms,
# history ms, id, by, comment, verb: deny (pending -> denied), revoke or relinquish (active ->
# ended, announced on the channel so live connections are cut everywhere at once).
_END = (
    _LIB
    + """
local rec, prefix, id, by, verb = KEYS[1], ARGV[1], ARGV[4], ARGV[5], ARGV[7]
local now, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local g = load(rec, now)
if not g then return missing(id) end
local final
if verb == 'deny' then
  if g.state ~= 'pending' then return wrong(id, g.state, 'pending') end
  final = 'denied'
  redis.call('ZREM', KEYS[3], id)
else
  if g.state ~= 'active' then return wrong(id, g.state, 'active') end
  if verb == 'relinquish' and by ~= g.user then
    return {'not_holder', 'only its holder can relinquish grant ' .. id}
  end
  final = verb == 'revoke' and 'revoked' or 'relinquished'
  redis.call('ZREM', active_key(prefix, g), id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('PUBLISH', KEYS[5], 'revoked ' .. id)
end
redis.call('HSET', rec, 'state', final, 'ended_at', secs(now), 'ended_by', by,
  'end_comment', ARGV[6])
retain(rec, KEYS[4], id, now + keep, now)
follow(KEYS[6], id, now + keep, now)
return reply(rec, 'ok', '')
"""
)

# KEYS: record, grants, history, events channel, unreviewed. ARGV: prefix, now ms, history ms,
# id, by, extra ms, longest total ms (from activation to the new expiry).
_EXTEND = (
    _LIB
    + """
local rec, prefix, id = KEYS[1], ARGV[1], ARGV[4]
local now, keep, extra, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6]),
  tonumber(ARGV[7])
local g = load(rec, now)
if not g then return missing(id) end
if g.state ~= 'active' then return wrong(id, g.state, 'active') end
local exp = ms(g.expires_at) + extra
local err = too_long(g, exp, most)
if err then return err end
redis.call('HSET', rec, 'expires_at', secs(exp), 'extended_by', ARGV[5])
redis.call('HINCRBY', rec, 'extensions', 1)
activate(prefix, g, id, exp, now, KEYS[2], keep)
retain(rec, KEYS[3], id, exp + keep, now)
follow(KEYS[5], id, exp + keep, now)
redis.call('PUBLISH', KEYS[4], 'extended ' .. id)
return reply(rec, 'ok', '')
"""
)

# KEYS: the request's record, its grant's record, pending, history. ARGV: prefix, now ms,
# history ms, request id, grant id, holder, extra ms, longest total ms, pending_until ms,
# comment, then the request's own fields. User, scope, entitlement and ticket are the
# grant's; the reason is the comment, else the grant's.
_REQUEST_EXTENSION = (
    _LIB
    + """
local rec, prec, prefix = KEYS[1], KEYS[2], ARGV[1]
local id, gid, by, comment = ARGV[4], ARGV[5], ARGV[6], ARGV[10]
local now, keep, extra, most, deadline = tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local g = load(prec, now)
if not g then return missing(gid) end
if g.state ~= 'active' then return wrong(gid, g.state, 'active') end
if by ~= g.user then return {'not_holder', 'only its holder can extend grant ' .. gid} end
local err = too_long(g, ms(g.expires_at) + extra, most)
if err then return err end
local last = g.extension_request or ''
if last ~= '' then
  local e = load(prefix .. 'grant:' .. last, now)
  if e and e.state == 'pending' then
    return {'extension_pending',
      'grant ' .. gid .. ' already has extension request ' .. last .. ' pending'}
  end
end
if redis.call('EXISTS', rec) == 1 then return {'exists', 'grant ' .. id .. ' exists'} end
redis.call('HSET', rec, unpack(ARGV, 11))
if comment == '' then comment = g.reason or '' end
redis.call('HSET', rec, 'user', g.user, 'scope', g.scope, 'entitlement', g.entitlement or '',
  'ticket', g.ticket or '', 'reason', comment)
redis.call('HSET', prec, 'extension_request', id)
index(KEYS[3], deadline, id, now - keep, keep)
retain(rec, KEYS[4], id, deadline + keep, now)
return reply(rec, 'ok', '')
"""
)

# KEYS: grants index, pending index, sweep cursor hash. ARGV: prefix, now ms, limit.
# Write down the grants that expired and the requests that lapsed since the last sweep,
# each exactly once whichever replica sweeps: the cursor moves in the same step.
_SWEEP = (
    _LIB
    + """
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local function sweep(idx, field, from, to, deadline)
  local since = tonumber(redis.call('HGET', KEYS[3], field) or '0')
  local found = redis.call('ZRANGEBYSCORE', idx, '(' .. since, now, 'WITHSCORES', 'LIMIT', 0, limit)
  local upto = now
  if #found >= 2 * limit then upto = tonumber(found[#found]) end
  for i = 1, #found, 2 do
    local id = found[i]
    local rec = prefix .. 'grant:' .. id
    if redis.call('HGET', rec, 'state') == from then
      redis.call('HSET', rec, 'state', to, 'ended_at', redis.call('HGET', rec, deadline),
                 'ended_by', 'jitgate')
      out[#out + 1] = to
      out[#out + 1] = id
    end
  end
  redis.call('HSET', KEYS[3], field, upto)
end
sweep(KEYS[1], 'expired', 'active', 'expired', 'expires_at')
sweep(KEYS[2], 'lapsed', 'pending', 'lapsed', 'pending_until')
return out
"""
)

# KEYS: record, unreviewed. ARGV: now ms, id, reviewer, comment. The follow-up review of
# break-glass access, once, by someone other than its holder, during the grant or after it.
_REVIEW = (
    _LIB
    + """
local rec, id, by = KEYS[1], ARGV[2], ARGV[3]
local now = tonumber(ARGV[1])
local g = load(rec, now)
if not g then return missing(id) end
if g.break_glass ~= '1' then
  return {'not_break_glass', 'grant ' .. id .. ' is not break-glass access'}
end
if g.state == 'pending' or g.state == 'denied' or g.state == 'lapsed' then
  return {'not_active', 'grant ' .. id .. ' is ' .. g.state .. ' and never gave access'}
end
if by == g.user then return {'self_review', 'cannot review your own break-glass access'} end
if (g.reviewed_by or '') ~= '' then
  return {'already_reviewed', 'grant ' .. id .. ' was already reviewed by ' .. g.reviewed_by}
end
redis.call('HSET', rec, 'reviewed_by', by, 'reviewed_at', secs(now), 'review_comment', ARGV[4])
redis.call('ZREM', KEYS[2], id)
return reply(rec, 'ok', '')
"""
)


class GrantError(Exception):
    """A refused transition; `code` is one of the codes below, the message is for people.

    not_found, not_pending, not_active, self_approval, duplicate_approval, not_holder,
    exceeds_max, exists, not_break_glass, self_review, already_reviewed, extension_pending.

    `grant` is None when nothing was written. It is the record as it now is when the refusal
    ended it: an extension request approved after its grant ended (or reached its maximum)
    is lapsed by that approval.
    """

    def __init__(self, code: str, message: str, grant: Grant | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.grant = grant


@dataclass(frozen=True)
class Approval:
    by: str
    at: float
    comment: str = ""


@dataclass(frozen=True)
class Grant:
    id: str
    user: str
    scope: str
    created_at: float
    expires_at: float  # 0.0 until active
    reason: str
    granted_by: str  # the admin of an added grant; the approvers of a requested one
    state: str = "active"
    ticket: str = ""
    entitlement: str = ""
    duration: float = 0.0  # seconds requested
    needed: int = 0  # approvals needed
    approvals: tuple[Approval, ...] = ()
    pending_until: float = 0.0
    activated_at: float = 0.0
    ended_at: float = 0.0
    ended_by: str = ""
    end_comment: str = ""
    break_glass: bool = False
    extensions: int = 0
    extended_by: str = ""
    reviewed_by: str = ""  # break-glass only: who did the follow-up review
    reviewed_at: float = 0.0
    review_comment: str = ""
    kind: str = "grant"  # "extension": a request to lengthen the grant `extends`
    extends: str = ""  # an extension request's grant
    max_total: float = 0.0  # an extension request's longest total for its grant, seconds
    extension_request: str = ""  # a grant's latest extension request

    def remaining(self, now: float | None = None) -> float:
        if self.state != "active":
            return 0.0
        return max(0.0, self.expires_at - (time.time() if now is None else now))

    def to_dict(self) -> dict[str, Any]:
        """Return the record for JSON; unset times are None."""
        d = asdict(self)
        d["approvals"] = [asdict(a) for a in self.approvals]
        unset = ("expires_at", "pending_until", "activated_at", "ended_at", "reviewed_at")
        for name in (*unset, "max_total"):
            d[name] = d[name] or None
        return d


class GrantStore(Protocol):
    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None: ...

    async def add(
        self, user: str, scope: str, ttl: float, reason: str, granted_by: str
    ) -> Grant: ...

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
    ) -> Grant: ...

    async def approve(
        self, grant_id: str, approver: str, comment: str = ""
    ) -> tuple[Grant, bool]: ...

    async def deny(self, grant_id: str, by: str, comment: str = "") -> Grant: ...

    async def revoke(self, grant_id: str, by: str = "", comment: str = "") -> Grant | None: ...

    async def relinquish(self, grant_id: str, user: str, comment: str = "") -> Grant: ...

    async def extend(
        self, grant_id: str, by: str, extra_seconds: float, max_total: float
    ) -> Grant: ...

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
    ) -> Grant: ...

    async def get(self, grant_id: str) -> Grant | None: ...

    async def list_pending(self, user: str | None = None) -> list[Grant]: ...

    async def review(self, grant_id: str, by: str, comment: str = "") -> Grant: ...

    async def list_unreviewed(self) -> list[Grant]: ...

    async def expiring_between(self, start: float, end: float) -> list[Grant]: ...

    async def claim_notices(self, kind: str, items: Iterable[tuple[str, float]]) -> list[bool]: ...

    async def count_active(self) -> int: ...

    async def sweep(self, limit: int = 500) -> list[Grant]: ...

    # Last, as in RedisGrants.
    async def list(
        self, user: str | None = None, states: Collection[str] | None = ("active",)
    ) -> list[Grant]: ...


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
        self, redis: Redis, prefix: str = "jit:", *, history_ttl: float = HISTORY_TTL
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
        self._create = redis.register_script(_CREATE)
        self._approve = redis.register_script(_APPROVE)
        self._end = redis.register_script(_END)
        self._extend = redis.register_script(_EXTEND)
        self._request_extension = redis.register_script(_REQUEST_EXTENSION)
        self._review = redis.register_script(_REVIEW)
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
        reply = await self._create(
            keys=[
                self._grant_key(grant_id),
                self._active_key(user, scope),
                self._index,
                self._pending,
                self._history,
                self._unreviewed,
            ],
            args=[now_ms, self._keep_ms, grant_id, deadline, *flat],
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
        found = [
            g
            for g in await self._fetch(ids, now_ms)
            if g.state == "pending" and (user is None or g.user == user)
        ]
        return sorted(found, key=lambda g: g.created_at)

    async def _fetch(self, ids: Iterable[Any], now_ms: int) -> list[Grant]:
        keys = [self._grant_key(_text(grant_id)) for grant_id in ids]
        if not keys:
            return []
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

    async def revocations(self, ping_every: float = 5.0) -> AsyncIterator[str | None]:
        """Yield None once subscribed, then the id of every grant ended early on any replica."""
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
