-- Move a partition's due timers into its stream, as its owner: each due timer's event is appended
-- to the stream and the timer removed in this one step, in due order, so a due timer reaches the
-- stream exactly once whatever happens to the instance; nothing unless the lease is still the one
-- given (a former owner moves nothing).  Each moved timer leaves a marker, member -> the entry id
-- of its firing, which its turn checks before running: a schedule or cancel of the member made
-- meanwhile removes it (lua/store.lua), and an entry no script moved has none.
--
-- KEYS[1]  the partition's lease
-- KEYS[2]  its timers zset (member -> due ms)
-- KEYS[3]  its timer-records hash (member -> the event as a stream entry's JSON)
-- KEYS[4]  its stream
-- KEYS[5]  its timers-fired hash (member -> the stream entry id of its firing on the way)
-- ARGV[1]  the lease as its owner holds it
-- ARGV[2]  now, in ms: timers due at or before it are moved
-- ARGV[3]  the most timers to move (at most a few thousand: they are unpacked as arguments)
-- ARGV[4]  the stream entry's field for the event
--
-- Returns {0} when the lease is not the one given; else {1, timers moved, timers still pending}.
local unpack = unpack or table.unpack
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return { 0 }
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
if #due == 0 then
  return { 1, 0, redis.call('ZCARD', KEYS[2]) }
end
local entries = redis.call('HMGET', KEYS[3], unpack(due))
local fired = {}
for i = 1, #due do
  if entries[i] then
    fired[#fired + 1] = due[i]
    fired[#fired + 1] = redis.call('XADD', KEYS[4], '*', ARGV[4], entries[i])
  end
end
if #fired > 0 then
  redis.call('HSET', KEYS[5], unpack(fired))
end
redis.call('HDEL', KEYS[3], unpack(due))
redis.call('ZREM', KEYS[2], unpack(due))
return { 1, #due, redis.call('ZCARD', KEYS[2]) }
