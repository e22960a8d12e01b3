-- KEYS: record, its active set, grants, pending, history, unreviewed, events channel.
-- ARGV: now ms, history ms, id, deadline ms (expiry if active, else pending_until), fields.
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
  redis.call('PUBLISH', KEYS[7], 'granted ' .. id)
else
  index(KEYS[4], deadline, id, now - keep, keep)
end
retain(rec, KEYS[5], id, deadline + keep, now)
return reply(rec, 'ok', '')
