-- KEYS: record, unreviewed. ARGV: now ms, id, reviewer, comment. The follow-up review of
-- break-glass access, once, by someone other than its holder, during the grant or after it.
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
