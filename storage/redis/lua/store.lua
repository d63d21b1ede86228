-- Store the pending changes of some subjects of one partition, all or nothing per call; a call may
-- be the commit of a turn: its writes, plus "event processed" and its stream entry acknowledged.
-- One script run carries one or more calls (the commits of several turns of a partition are sent
-- together); each call is checked and applied on its own, in order, as if it were run alone.
--
-- ARGV[1]  the hash field keeping the latest write tokens (keys.WRITE_TOKENS_FIELD)
-- ARGV[2]  how many tokens that field keeps
-- ARGV[3]  the hash field of a writer's claim (keys.CLAIM_FIELD)
-- ARGV[4]  '' for plain stores; for commits, the consumer group
-- ARGV[5]  commits: 0, or a window in ms: forget processed ids committed longer ago than that
-- ARGV[6]  the fence, or '' for none: for commits, the partition's lease as its owner holds it
--          ('<epoch>:<instance>:<nonce>'); for plain stores made on behalf of a turn of partition q,
--          '<q>:<epoch>' (refused when this slot knows a newer epoch of q)
-- ARGV[7]  the number of calls
-- then, for each call: its write token ('' when no change is a callable update), 0 or the claim
--   lease in ms (on a conflict, claim the conflicting subjects), the id of the event whose turn it
--   commits ('' for a plain store), the stream entry to acknowledge (or ''), its number of subjects,
--   and for each of its subjects: nchecks, nsets, ndels, followed by
--   nchecks pairs (field, the JSON a callable update saw, or '' for "missing"),
--   nsets pairs (field, JSON to store), and ndels fields to remove.
--   A call with timer changes gives its number of subjects negated and, after its subjects'
--   changes, ntimers followed by ntimers triples (member, due ms, entry JSON) to schedule, or
--   (member, '', '') to cancel (keys.timer_member); they are applied when its changes are.
-- KEYS     plain stores: the partition's fences hash when there is a fence; commits: the
--          partition's processed-id set, its stream, its lease; then the subject hashes of every
--          call, in order, each call's followed by the partition's timers zset and timer-records
--          hash when it has timer changes (one partition, hence one cluster slot).
--
-- Returns one reply per call, in order:
--   {1}  the changes are stored (and, for a commit, the event marked processed and the entry
--        acknowledged), by this call or by an earlier one with the same token whose reply was
--        lost (so a retried write is never applied twice);
--   {0, conflict, ...}  a checked field no longer holds what the callable saw: nothing of the call
--        is written, and each conflict is {subject index, field, current JSON or nil, field, ...};
--   {2}  another writer holds an unexpired claim on a subject with callable updates: nothing of the
--        call is written; retry after a pause;
--   {3}  commit only: the event was committed before (by another consumer, or by this commit
--        whose reply was lost): nothing is written, the entry is acknowledged;
--   {4}  fenced: the lease is not (or no longer) the one given, or a newer owner of partition q
--        started: nothing is written, nothing acknowledged (every call of the run).
-- A claim ('<token>:<expiry ms>') lets a writer that keeps losing compare-and-sets win the next
-- one: it blocks other callable updates of the subject until it is used or expires.
local unpack = unpack or table.unpack
local tokens_field = ARGV[1]
local keep = tonumber(ARGV[2])
local claim_field = ARGV[3]
local group = ARGV[4]
local window = tonumber(ARGV[5])
local fence = ARGV[6]
local ncalls = tonumber(ARGV[7])
local committing = group ~= ''
local nextkey = 1
if committing then
  nextkey = 4
  if fence ~= '' and redis.call('GET', KEYS[3]) ~= fence then
    local fenced = {}
    for c = 1, ncalls do
      fenced[c] = { 4 }
    end
    return fenced
  end
elseif fence ~= '' then
  nextkey = 2
  local sep = string.find(fence, ':', 1, true)
  local newest = redis.call('HGET', KEYS[1], string.sub(fence, 1, sep - 1))
  if newest and tonumber(newest) > tonumber(string.sub(fence, sep + 1)) then
    local fenced = {}
    for c = 1, ncalls do
      fenced[c] = { 4 }
    end
    return fenced
  end
end
local CHUNK = 1000 -- arguments per HSET/HDEL, far below Lua's unpack limit

local now = false
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

local function holds_token(tokens, token, width)
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

-- One call: subjects KEYS[first..last], their changes from ARGV[pos]; returns its reply.
local function store(token, lease, first, last, pos)
  local width = #token
  -- Pass 1: read what the callable updates saw and collect conflicts; write nothing.
  local plans = {}
  local conflicts = {}
  local blocked = false
  for k = first, last do
    local nchecks, nsets, ndels = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
    local checks = pos + 3
    local sets = checks + 2 * nchecks
    local dels = sets + 2 * nsets
    pos = dels + ndels
    local plan = { nchecks = nchecks, sets = sets, nsets = nsets, dels = dels, ndels = ndels, tokens = false,
                   claim = false, conflict = false }
    if nchecks > 0 then
      local fields = {}
      for i = 1, nchecks do
        fields[i] = ARGV[checks + 2 * (i - 1)]
      end
      fields[nchecks + 1] = tokens_field
      fields[nchecks + 2] = claim_field
      local current = redis.call('HMGET', KEYS[k], unpack(fields))
      plan.tokens = current[nchecks + 1]
      if holds_token(plan.tokens, token, width) then
        return { 1 }
      end
      plan.claim = current[nchecks + 2]
      if plan.claim and string.sub(plan.claim, 1, width) ~= token
          and tonumber(string.sub(plan.claim, width + 2)) > clock() then
        blocked = true
      end
      for i = 1, nchecks do
        if (current[i] or '') ~= ARGV[checks + 2 * i - 1] then
          if not plan.conflict then
            plan.conflict = { k - first + 1 }
          end
          plan.conflict[#plan.conflict + 1] = fields[i]
          plan.conflict[#plan.conflict + 1] = current[i]
        end
      end
      if plan.conflict then
        conflicts[#conflicts + 1] = plan.conflict
      end
    end
    plans[k] = plan
  end
  if blocked then
    return { 2 }
  end
  if #conflicts > 0 then
    if lease > 0 then
      for k = first, last do
        if plans[k].conflict then
          redis.call('HSET', KEYS[k], claim_field, token .. ':' .. (clock() + lease))
        end
      end
    end
    return { 0, unpack(conflicts) }
  end

  -- Pass 2: write; one HSET and at most one HDEL per subject in the usual case.
  for k = first, last do
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
    args = {}
    for i = plan.dels, plan.dels + plan.ndels - 1 do
      args[#args + 1] = ARGV[i]
      if #args == CHUNK then
        redis.call('HDEL', key, unpack(args))
        args = {}
      end
    end
    if plan.claim then -- ours, now used, or someone's expired one
      args[#args + 1] = claim_field
    end
    if #args > 0 then
      redis.call('HDEL', key, unpack(args))
    end
    -- A subject exists while it has a property: drop a hash left with nothing but metadata.
    if plan.ndels > 0 and plan.nsets == 0 then
      local left = redis.call('HLEN', key)
      if left > 0 and left <= 2 then
        local meta = redis.call('HMGET', key, tokens_field, claim_field)
        if (meta[1] and 1 or 0) + (meta[2] and 1 or 0) == left then
          redis.call('DEL', key)
        end
      end
    end
  end
  return { 1 }
end

-- The end of the changes of the subjects KEYS[first..last] whose changes start at ARGV[pos].
local function skip(first, last, pos)
  for _ = first, last do
    pos = pos + 3 + 2 * tonumber(ARGV[pos]) + 2 * tonumber(ARGV[pos + 1]) + tonumber(ARGV[pos + 2])
  end
  return pos
end

-- Schedule or cancel the timers listed from ARGV[pos] in the zset zkey and the records hash hkey.
local function timers(zkey, hkey, pos)
  for i = pos + 1, pos + 3 * tonumber(ARGV[pos]), 3 do
    if ARGV[i + 1] == '' then
      redis.call('ZREM', zkey, ARGV[i])
      redis.call('HDEL', hkey, ARGV[i])
    else
      redis.call('ZADD', zkey, ARGV[i + 1], ARGV[i])
      redis.call('HSET', hkey, ARGV[i], ARGV[i + 2])
    end
  end
end

local replies = {}
local pos = 8
local committed = false
for c = 1, ncalls do
  local token, lease, event_id, entry_id = ARGV[pos], tonumber(ARGV[pos + 1]), ARGV[pos + 2], ARGV[pos + 3]
  local nsubjects = tonumber(ARGV[pos + 4])
  local timed = false
  if nsubjects < 0 then
    nsubjects = -nsubjects
    timed = true
  end
  local first = nextkey
  local last = first + nsubjects - 1
  pos = pos + 5
  nextkey = last + 1
  if timed then
    timed = nextkey
    nextkey = nextkey + 2
  end
  if event_id ~= '' and redis.call('ZSCORE', KEYS[1], event_id) then
    if entry_id ~= '' then
      redis.call('XACK', KEYS[2], group, entry_id)
    end
    replies[c] = { 3 }
  else
    replies[c] = store(token, lease, first, last, pos)
    if event_id ~= '' and replies[c][1] == 1 then
      committed = clock()
      redis.call('ZADD', KEYS[1], committed, event_id)
      if entry_id ~= '' then
        redis.call('XACK', KEYS[2], group, entry_id)
      end
    end
  end
  pos = skip(first, last, pos)
  if timed then
    if replies[c][1] == 1 then
      timers(KEYS[timed], KEYS[timed + 1], pos)
    end
    pos = pos + 1 + 3 * tonumber(ARGV[pos])
  end
end
if committed and window > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', committed - window)
end
return replies
