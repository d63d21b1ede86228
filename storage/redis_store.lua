-- Store the pending changes of some subjects of one partition, all or nothing.
--
-- KEYS     the subject hashes (one partition, hence one cluster slot)
-- ARGV[1]  the write token of this call, or '' when no change is a callable update
-- ARGV[2]  the hash field keeping the latest write tokens (keys.WRITE_TOKENS_FIELD)
-- ARGV[3]  how many tokens that field keeps
-- then, for each key in order: nchecks, nsets, ndels, followed by
--   nchecks pairs (field, the JSON a callable update saw, or '' for "missing"),
--   nsets pairs (field, JSON to store), and ndels fields to remove.
--
-- Returns {1} when the changes are stored, by this call or by an earlier one with the same token
-- whose reply was lost (so a retried write is never applied twice).  Returns {0, conflict, ...}
-- when a checked field no longer holds what the callable saw: then nothing at all is written, and
-- each conflict is {key index, field, current JSON or nil, field, current JSON or nil, ...}.
local unpack = unpack or table.unpack
local token = ARGV[1]
local tokens_field = ARGV[2]
local keep = tonumber(ARGV[3])
local width = #token
local CHUNK = 1000 -- arguments per HSET/HDEL, far below Lua's unpack limit

local function holds_token(tokens)
  if not tokens or width == 0 then
    return false
  end
  for i = 1, #tokens, width do
    if string.sub(tokens, i, i + width - 1) == token then
      return true
    end
  end
  return false
end

-- Pass 1: read what the callable updates saw and collect conflicts; write nothing.
local plans = {}
local conflicts = {}
local pos = 4
for k = 1, #KEYS do
  local nchecks, nsets, ndels = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
  local checks = pos + 3
  local sets = checks + 2 * nchecks
  local dels = sets + 2 * nsets
  pos = dels + ndels
  local plan = { nchecks = nchecks, sets = sets, nsets = nsets, dels = dels, ndels = ndels, tokens = false }
  if nchecks > 0 then
    local fields = {}
    for i = 1, nchecks do
      fields[i] = ARGV[checks + 2 * (i - 1)]
    end
    fields[nchecks + 1] = tokens_field
    local current = redis.call('HMGET', KEYS[k], unpack(fields))
    plan.tokens = current[nchecks + 1]
    if holds_token(plan.tokens) then
      return { 1 }
    end
    local conflict = false
    for i = 1, nchecks do
      if (current[i] or '') ~= ARGV[checks + 2 * i - 1] then
        if not conflict then
          conflict = { k }
        end
        conflict[#conflict + 1] = fields[i]
        conflict[#conflict + 1] = current[i]
      end
    end
    if conflict then
      conflicts[#conflicts + 1] = conflict
    end
  end
  plans[k] = plan
end
if #conflicts > 0 then
  return { 0, unpack(conflicts) }
end

-- Pass 2: write; one HSET and at most one HDEL per subject in the usual case.
for k = 1, #KEYS do
  local key, plan = KEYS[k], plans[k]
  local args = {}
  for i = plan.sets, plan.sets + 2 * plan.nsets - 1 do
    args[#args + 1] = ARGV[i]
    if #args == CHUNK then
      redis.call('HSET', key, unpack(args))
      args = {}
    end
  end
  if plan.nchecks > 0 then
    args[#args + 1] = tokens_field
    args[#args + 1] = token .. string.sub(plan.tokens or '', 1, (keep - 1) * width)
  end
  if #args > 0 then
    redis.call('HSET', key, unpack(args))
  end
  if plan.ndels > 0 then
    args = {}
    for i = plan.dels, plan.dels + plan.ndels - 1 do
      args[#args + 1] = ARGV[i]
      if #args == CHUNK then
        redis.call('HDEL', key, unpack(args))
        args = {}
      end
    end
    if #args > 0 then
      redis.call('HDEL', key, unpack(args))
    end
    -- A subject exists while it has a property: drop a hash left with nothing but its tokens.
    if plan.nsets == 0 and redis.call('HLEN', key) == 1 and redis.call('HEXISTS', key, tokens_field) == 1 then
      redis.call('DEL', key)
    end
  end
end
return { 1 }
