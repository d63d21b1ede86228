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
--   (member, '', '') to cancel (keys.timer_member), or (member, '=', entry id) when the call ends
--   the turn of that timer's firing; they are applied when its changes are.  A schedule or a
--   cancel also removes the member's fired marker (its firing on the way, if any, is stale now);
--   a firing's end removes it only if it still names that firing's entry (not a newer firing's).
-- KEYS     plain stores: the partition's fences hash when there is a fence; commits: the
--          partition's processed-id set, its stream, its lease; then the subject hashes of every
--          call, in order, each call's followed by the partition's timers zset, timer-records
--          hash and timers-fired hash when it has timer changes (one partition, hence one cluster
--          slot).
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
local STORED, CLAIMED, DONE_BEFORE, NONE = { 1 }, { 2 }, { 3 }, {} -- replies shared by the calls

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
  local width = #token -- 0 when the call has no callable update: nothing to check
  local tokens, claims = NONE, NONE
  if width > 0 then
    tokens, claims = {}, {}
    -- Pass 1: read what the callable updates saw and collect conflicts; write nothing.
    local conflicts = {}
    local blocked = false
    local at = pos
    for k = first, last do
      local nchecks, nsets, ndels = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
      local checks = at + 3
      at = checks + 2 * nchecks + 2 * nsets + ndels
      if nchecks > 0 then
        local fields = {}
        for i = 1, nchecks do
          fields[i] = ARGV[checks + 2 * (i - 1)]
        end
        fields[nchecks + 1] = tokens_field
        fields[nchecks + 2] = claim_field
        local current = redis.call('HMGET', KEYS[k], unpack(fields))
        tokens[k] = current[nchecks + 1]
        if holds_token(tokens[k], token, width) then
          return STORED
        end
        local claim = current[nchecks + 2]
        claims[k] = claim
        if claim and string.sub(claim, 1, width) ~= token and tonumber(string.sub(claim, width + 2)) > clock() then
          blocked = true
        end
        local conflict = false
        for i = 1, nchecks do
          if (current[i] or '') ~= ARGV[checks + 2 * i - 1] then
            if not conflict then
              conflict = { k - first + 1 }
              conflicts[#conflicts + 1] = conflict
            end
            conflict[#conflict + 1] = fields[i]
            conflict[#conflict + 1] = current[i]
          end
        end
      end
    end
    if blocked then
      return CLAIMED
    end
    if #conflicts > 0 then
      if lease > 0 then
        for _, conflict in ipairs(conflicts) do
          redis.call('HSET', KEYS[first + conflict[1] - 1], claim_field, token .. ':' .. (clock() + lease))
        end
      end
      return { 0, unpack(conflicts) }
    end
  end

  -- Pass 2: write; one HSET and at most one HDEL per subject in the usual case.
  for k = first, last do
    local key = KEYS[k]
    local nchecks, nsets, ndels = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
    local sets = pos + 3 + 2 * nchecks
    local dels = sets + 2 * nsets
    pos = dels + ndels
    local claim = claims[k]
    if nchecks == 0 and nsets > 0 and 2 * nsets <= CHUNK then
      redis.call('HSET', key, unpack(ARGV, sets, dels - 1))
    elseif nsets > 0 or nchecks > 0 then
      local args = {}
      for i = sets, dels - 1 do
        args[#args + 1] = ARGV[i]
        if #args == CHUNK then
          redis.call('HSET', key, unpack(args))
          args = {}
        end
      end
      if nchecks > 0 then
        args[#args + 1] = tokens_field
        args[#args + 1] = token .. string.sub(tokens[k] or '', 1, (keep - 1) * width)
      end
      if #args > 0 then
        redis.call('HSET', key, unpack(args))
      end
    end
    if not claim and ndels > 0 and ndels <= CHUNK then
      redis.call('HDEL', key, unpack(ARGV, dels, pos - 1))
    elseif ndels > 0 or claim then
      local args = {}
      for i = dels, pos - 1 do
        args[#args + 1] = ARGV[i]
        if #args == CHUNK then
          redis.call('HDEL', key, unpack(args))
          args = {}
        end
      end
      if claim then -- ours, now used, or someone's expired one
        args[#args + 1] = claim_field
      end
      if #args > 0 then
        redis.call('HDEL', key, unpack(args))
      end
    end
    -- A subject exists while it has a property: drop a hash left with nothing but metadata.
    if ndels > 0 and nsets == 0 then
      local left = redis.call('HLEN', key)
      if left > 0 and left <= 2 then
        local meta = redis.call('HMGET', key, tokens_field, claim_field)
        if (meta[1] and 1 or 0) + (meta[2] and 1 or 0) == left then
          redis.call('DEL', key)
        end
      end
    end
  end
  return STORED
end

-- The end of the changes of the subjects KEYS[first..last] whose changes start at ARGV[pos].
local function skip(first, last, pos)
  for _ = first, last do
    pos = pos + 3 + 2 * tonumber(ARGV[pos]) + 2 * tonumber(ARGV[pos + 1]) + tonumber(ARGV[pos + 2])
  end
  return pos
end

-- Apply the timer changes listed from ARGV[pos] to the zset zkey, the records hash hkey and the
-- fired markers fkey.
local function timers(zkey, hkey, fkey, pos)
  for i = pos + 1, pos + 3 * tonumber(ARGV[pos]), 3 do
    local member, due = ARGV[i], ARGV[i + 1]
    if due == '=' then
      if redis.call('HGET', fkey, member) == ARGV[i + 2] then
        redis.call('HDEL', fkey, member)
      end
    elseif due == '' then
      redis.call('ZREM', zkey, member)
      redis.call('HDEL', hkey, member)
      redis.call('HDEL', fkey, member)
    else
      redis.call('ZADD', zkey, due, member)
      redis.call('HSET', hkey, member, ARGV[i + 2])
      redis.call('HDEL', fkey, member)
    end
  end
end

-- Where each call starts, its subject keys and its timer changes (if any); for commits, which
-- events were committed before (one ZMSCORE for all).
local starts, ids, firsts, lasts, timed = {}, {}, {}, {}, {}
do
  local at, k = 8, nextkey
  for c = 1, ncalls do
    starts[c] = at
    ids[c] = ARGV[at + 2]
    local nsubjects = tonumber(ARGV[at + 4])
    local has_timers = nsubjects < 0
    if has_timers then
      nsubjects = -nsubjects
    end
    firsts[c], lasts[c] = k, k + nsubjects - 1
    at = skip(k, lasts[c], at + 5)
    k = lasts[c] + 1
    if has_timers then -- the timers zset, records hash and fired markers follow the call's subjects
      timed[c] = { k, at }
      k = k + 3
      at = at + 1 + 3 * tonumber(ARGV[at])
    end
  end
end
local before = {}
if committing then
  for i = 1, ncalls, CHUNK do
    local scores = redis.call('ZMSCORE', KEYS[1], unpack(ids, i, math.min(ncalls, i + CHUNK - 1)))
    for j = 1, #scores do
      if scores[j] then
        before[ids[i + j - 1]] = true
      end
    end
  end
end

local replies = {}
local processed, acks = {}, {}
for c = 1, ncalls do
  local pos = starts[c]
  local token, lease, event_id, entry_id = ARGV[pos], tonumber(ARGV[pos + 1]), ids[c], ARGV[pos + 3]
  local reply
  if committing and before[event_id] then
    reply = DONE_BEFORE
  else
    reply = store(token, lease, firsts[c], lasts[c], pos + 5)
    if reply == STORED then
      local timer_changes = timed[c]
      if timer_changes then
        local k = timer_changes[1]
        timers(KEYS[k], KEYS[k + 1], KEYS[k + 2], timer_changes[2])
      end
      if committing then
        before[event_id] = true -- the same event again later in this run is a duplicate
        processed[#processed + 1] = clock()
        processed[#processed + 1] = event_id
      end
    end
  end
  replies[c] = reply
  if entry_id ~= '' and (reply == STORED or reply == DONE_BEFORE) then
    acks[#acks + 1] = entry_id
  end
end
if #processed > 0 then
  for i = 1, #processed, CHUNK do -- CHUNK is even: (score, id) pairs stay whole
    redis.call('ZADD', KEYS[1], unpack(processed, i, math.min(#processed, i + CHUNK - 1)))
  end
  if window > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', clock() - window)
  end
end
for i = 1, #acks, CHUNK do
  redis.call('XACK', KEYS[2], group, unpack(acks, i, math.min(#acks, i + CHUNK - 1)))
end
return replies
