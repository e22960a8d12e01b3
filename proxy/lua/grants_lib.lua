-- Shared by every transition. Each returns {status, detail, field, value, ...}: status "ok"
-- and the record as it now is, or an error code and message (nothing written).
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

-- A request leaves pending: its person may file the next one for that scope at once.
local function unwait(prefix, g, id)
  local key = prefix .. 'waiting:' .. #g.user .. ':' .. g.user .. ':' .. g.scope
  if redis.call('GET', key) == id then redis.call('DEL', key) end
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
