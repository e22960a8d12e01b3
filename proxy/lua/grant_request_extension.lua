-- KEYS: the request's record, its grant's record, pending, history. ARGV: prefix, now ms,
-- history ms, request id, grant id, holder, extra ms, longest total ms, pending_until ms,
-- comment, then the request's own fields. User, scope, entitlement and ticket are the
-- grant's; the reason is the comment, else the grant's.
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
