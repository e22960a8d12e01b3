#!lua flags=no-writes
-- KEYS: index, stream. ARGV: min score, max score, count, '1' for newest first, and the
-- member to continue after with its score ('' '' to start at the range's end).
-- Returns flat {member, score, line or false, ...}; false where the entry is gone.
local index, stream = KEYS[1], KEYS[2]
local lo, hi, count, rev = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local after, after_score = ARGV[5], ARGV[6]
local function num(s)
  if s == '+inf' then return math.huge elseif s == '-inf' then return -math.huge end
  return tonumber(s)
end
local rank = false
if after ~= '' then
  rank = redis.call(rev and 'ZREVRANK' or 'ZRANK', index, after)
end
local members
if rank then
  -- Continue by rank right after the member: as cheap inside a millisecond holding
  -- thousands of members as anywhere else.
  if rev then
    members = redis.call('ZRANGE', index, rank + 1, rank + count, 'REV', 'WITHSCORES')
  else
    members = redis.call('ZRANGE', index, rank + 1, rank + count, 'WITHSCORES')
  end
else
  -- A fresh start, or the member is gone: start at its score; the caller skips the
  -- members up to it.
  if after ~= '' then
    if rev then hi = after_score else lo = after_score end
  end
  if rev then
    members = redis.call('ZRANGE', index, hi, lo, 'BYSCORE', 'REV', 'LIMIT', 0, count, 'WITHSCORES')
  else
    members = redis.call('ZRANGE', index, lo, hi, 'BYSCORE', 'LIMIT', 0, count, 'WITHSCORES')
  end
end
local stop = num(rev and lo or hi)
local out = {}
for i = 1, #members, 2 do
  local score = tonumber(members[i + 1])
  if (rev and score < stop) or (not rev and score > stop) then break end
  local id = entry_of(members[i])
  local found = redis.call('XRANGE', stream, id, id)
  local line = false
  if found[1] then line = record_of(found[1][2]) or false end
  out[#out + 1] = members[i]
  out[#out + 1] = members[i + 1]
  out[#out + 1] = line
end
return out
