-- KEYS: grants index, pending index, sweep cursor hash. ARGV: prefix, now ms, limit.
-- Write down the grants that expired and the requests that lapsed since the last sweep,
-- each exactly once whichever replica sweeps: the cursor moves in the same step.
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
