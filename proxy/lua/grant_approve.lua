-- KEYS: record, grants, pending, history, unreviewed, events channel. ARGV: prefix, now ms,
-- history ms, id, approver, comment. Detail "1" when this approval activated the grant (its
-- clock starts now) or applied the extension request (its grant's expiry moved, announced on
-- the channel). An extension request whose grant is no longer active, or already lasts its
-- maximum, ends lapsed with this approval: the reply is then an error code and message
-- followed by the request as it now is, and its grant is left untouched.
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
  unwait(prefix, g, id)
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
unwait(prefix, g, id)
redis.call('HSET', rec, 'state', 'active', 'activated_at', secs(now), 'expires_at', secs(exp),
  'granted_by', names)
redis.call('ZREM', KEYS[3], id)
activate(prefix, g, id, exp, now, KEYS[2], keep)
retain(rec, KEYS[4], id, exp + keep, now)
if g.break_glass == '1' then index(KEYS[5], exp + keep, id, now, 0) end
redis.call('PUBLISH', KEYS[6], 'granted ' .. id)
return reply(rec, 'ok', '1')
