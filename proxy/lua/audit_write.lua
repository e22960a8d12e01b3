#!lua
-- KEYS: stream, batch marker. ARGV: index prefix, the marker's lifetime in seconds, the lines.
-- Returns -1 when the batch marker was already set, else how many lines were not JSON objects.
local stream, prefix = KEYS[1], ARGV[1]
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return -1 end
local malformed = 0
for i = 3, #ARGV do
  local line = ARGV[i]
  local score, keys, ok = index_of(prefix, line)
  if not ok then malformed = malformed + 1 end
  local id = redis.call('XADD', stream, '*', 'record', line)
  local member = member_of(id)
  score = score or string.match(id, '^(%d+)')
  for _, k in ipairs(keys) do redis.call('ZADD', k, score, member) end
end
return malformed
