-- KEYS: record, grants, history, events channel, unreviewed. ARGV: prefix, now ms, history ms,
-- id, by, extra ms, longest total ms (from activation to the new expiry).
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
