-- Read a partition's stream as its owner: nothing unless the lease is still the one given, so an
-- instance that lost the partition (paused, cut off) can no longer take entries from its new owner.
--
-- KEYS[1]  the partition's lease key
-- KEYS[2]  the partition's stream
-- ARGV[1]  the lease as its owner holds it
-- ARGV[2]  the consumer group, ARGV[3] the consumer, ARGV[4] COUNT
-- ARGV[5]  '>' for new entries, or an id: the consumer's own pending entries after it
--
-- Returns {0} when the lease is not the one given; {1, entries} (entries as XREADGROUP gives one
-- stream's); {2, last id} when there is nothing new, last id being the stream's newest entry (or
-- '0-0'): a blocking XREAD from it wakes when the next entry comes.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return { 0 }
end
local found = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[2], ARGV[5])
if found and (ARGV[5] ~= '>' or #found[1][2] > 0) then
  return { 1, found[1][2] }
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return { 2, last[1] and last[1][1] or '0-0' }
