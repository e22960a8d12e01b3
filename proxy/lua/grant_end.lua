-- KEYS: record, grants, pending, history, events channel, unreviewed. ARGV: prefix, now ms,
-- history ms, id, by, comment, verb: deny (pending -> denied), revoke or relinquish (active ->
-- ended, announced on the channel so live connections are cut everywhere at once).
local rec, prefix, id, by, verb = KEYS[1], ARGV[1], ARGV[4], ARGV[5], ARGV[7]
local now, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
local g = load(rec, now)
if not g then return missing(id) end
local final
if verb == 'deny' then
  if g.state ~= 'pending' then return wrong(id, g.state, 'pending') end
  final = 'denied'
  redis.call('ZREM', KEYS[3], id)
  unwait(prefix, g, id)
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
