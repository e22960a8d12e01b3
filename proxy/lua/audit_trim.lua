#!lua
-- KEYS: stream. ARGV: index prefix, maxlen (-1: none), retention in ms (-1: none), chunk.
-- Returns how many entries were removed.
local stream, prefix = KEYS[1], ARGV[1]
local maxlen, retention, chunk = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local excess = 0
if maxlen >= 0 then excess = redis.call('XLEN', stream) - maxlen end
local cutoff = -1
if retention >= 0 then
  local now = redis.call('TIME')
  cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - retention
end
local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', chunk + 1)
local removed, boundary = 0, nil
for i, e in ipairs(entries) do
  local id = e[1]
  local ms = tonumber(string.match(id, '^(%d+)'))
  if i > chunk or not (i <= excess or ms < cutoff) then
    boundary = id
    break
  end
  local _, keys = index_of(prefix, record_of(e[2]))
  local member = member_of(id)
  for _, k in ipairs(keys) do redis.call('ZREM', k, member) end
  removed = removed + 1
end
if removed > 0 then
  if boundary then
    redis.call('XTRIM', stream, 'MINID', boundary)
  else
    redis.call('XTRIM', stream, 'MAXLEN', 0)
  end
end
return removed
