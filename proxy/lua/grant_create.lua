-- KEYS: record, its active set, grants, pending, history, unreviewed, events channel, and
-- for a request that waits for approval the user's waiting key for its scope.
-- ARGV: now ms, history ms, id, deadline ms (expiry if active, else pending_until), fields.
local rec, id = KEYS[1], ARGV[3]
local now, keep, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if redis.call('EXISTS', rec) == 1 then return {'exists', 'grant ' .. id .. ' exists'} end
if KEYS[8] then
  -- One request per person and scope waits at a time: checked and taken in this script,
  -- so concurrent identical requests cannot all get in. The key names the last request
  -- filed; it counts only while that request is still pending.
  local other = redis.call('GET', KEYS[8])
  if other then
    local base = string.sub(rec, 1, #rec - #id)
    local o = redis.call('HMGET', base .. other, 'state', 'pending_until', 'scope')
    if o[1] == 'pending' and (tonumber(o[2]) or 0) * 1000 > now then
      return {'already_pending', 'your request ' .. other .. ' for ' .. o[3] ..
        ' is already waiting for approval'}
    end
  end
  redis.call('SET', KEYS[8], id, 'PX', math.max(1, deadline - now))
end
redis.call('HSET', rec, unpack(ARGV, 5))
if redis.call('HGET', rec, 'state') == 'active' then
  index(KEYS[2], deadline, id, now, 0)
  index(KEYS[3], deadline, id, now - keep, keep)
  if redis.call('HGET', rec, 'break_glass') == '1' then
    index(KEYS[6], deadline + keep, id, now, 0)
  end
  redis.call('PUBLISH', KEYS[7], 'granted ' .. id)
else
  index(KEYS[4], deadline, id, now - keep, keep)
end
retain(rec, KEYS[5], id, deadline + keep, now)
return reply(rec, 'ok', '')
