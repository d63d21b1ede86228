-- Claim back the owner's own entries of a partition left idle too long (a turn whose commit kept
-- failing), except those still being worked on in the owner's process, unless the lease is no
-- longer the one given.  XCLAIM counts a delivery for each entry claimed; the entries skipped are
-- left as they are, so a busy instance does not count deliveries of entries it is only slow with.
--
-- KEYS[1]  the partition's lease key
-- KEYS[2]  the partition's stream
-- ARGV[1]  the lease as its owner holds it
-- ARGV[2]  the consumer group, ARGV[3] the consumer, ARGV[4] the minimum idle time in ms,
-- ARGV[5]  how many entries to claim at most
-- ARGV[6..] the ids of the entries to leave (being worked on)
--
-- Returns {0} when the lease is not the one given, else {1, the XCLAIM reply (entries)}.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return { 0 }
end
local leave = {}
for i = 6, #ARGV do
  leave[ARGV[i]] = true
end
local idle = redis.call('XPENDING', KEYS[2], ARGV[2], 'IDLE', ARGV[4], '-', '+', tonumber(ARGV[5]) + #ARGV - 5)
local ids = {}
for _, row in ipairs(idle) do
  if not leave[row[1]] and #ids < tonumber(ARGV[5]) then
    ids[#ids + 1] = row[1]
  end
end
if #ids == 0 then
  return { 1, {} }
end
return { 1, redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], ARGV[4], unpack(ids)) }
