-- Shared by every script that adds or removes index members, so that trimming removes
-- exactly the members that writing added. audit/store.py fills in the sequence width.
local FIELDS = {
  {'user', 'user:'}, {'scope', 'scope:'}, {'recording', 'recording:'},
  {'grant_id', 'grant:'}, {'event', 'event:'}, {'subject', 'subject:'},
}

local function member_of(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if #seq < SEQ_WIDTH then seq = string.rep('0', SEQ_WIDTH - #seq) .. seq end
  return ms .. '-' .. seq
end

local function entry_of(member)
  return (string.gsub(member, '%-0+(%d)', '-%1'))
end

-- The index score (nil: use the entry's time), the index keys, and whether the line
-- is a JSON object.
local function index_of(prefix, line)
  local keys = {prefix .. 't'}
  if type(line) ~= 'string' then return nil, keys, false end
  local ok, rec = pcall(cjson.decode, line)
  -- cjson decodes arrays to tables too; only an object is a record.
  if not ok or type(rec) ~= 'table' or not string.find(line, '^%s*{') then
    return nil, keys, false
  end
  local score = nil
  local ts = rec['ts']
  if type(ts) == 'number' and ts == ts and ts ~= math.huge and ts ~= -math.huge then
    score = string.format('%.17g', ts * 1000)
  end
  for _, f in ipairs(FIELDS) do
    local v = rec[f[1]]
    if type(v) == 'string' then keys[#keys + 1] = prefix .. f[2] .. v end
  end
  local event, grant = rec['event'], rec['grant_id']
  if type(event) == 'string' and type(grant) == 'string'
      and (string.sub(event, 1, 6) == 'grant.' or event == 'break_glass') then
    keys[#keys + 1] = prefix .. 'lifecycle:' .. grant
  end
  return score, keys, true
end

local function record_of(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'record' then return fields[j + 1] end
  end
  return nil
end
