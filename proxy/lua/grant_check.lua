-- KEYS: the active sets of every covering scope, narrowest first. ARGV: now (ms).
-- Returns {id, expiry ms} of the longest-lived grant of the narrowest scope that has one.
local since = '(' .. ARGV[1]
for _, key in ipairs(KEYS) do
  local found = redis.call('ZREVRANGEBYSCORE', key, '+inf', since, 'WITHSCORES', 'LIMIT', 0, 1)
  if found[1] then return found end
end
return false
