#!lua
-- KEYS: stream. ARGV: index prefix, the last entry id done ('' to start), chunk.
-- Returns {entries indexed, last entry id or ''}.
local stream, prefix, after, chunk = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local start = '-'
if after ~= '' then start = '(' .. after end
local entries = redis.call('XRANGE', stream, start, '+', 'COUNT', chunk)
local last = ''
for _, e in ipairs(entries) do
  local id = e[1]
  local score, keys = index_of(prefix, record_of(e[2]))
  score = score or string.match(id, '^(%d+)')
  local member = member_of(id)
  for _, k in ipairs(keys) do redis.call('ZADD', k, score, member) end
  last = id
end
return {#entries, last}
