-- Claim a partition's pending entries as its owner (XAUTOCLAIM), unless the lease is no longer the
-- one given.
--
-- KEYS[1]  the partition's lease key
-- KEYS[2]  the partition's stream
-- ARGV[1]  the lease as its owner holds it
-- ARGV[2]  the consumer group, ARGV[3] the consumer, ARGV[4] the minimum idle time in ms,
-- ARGV[5]  the start id, ARGV[6] COUNT, ARGV[7] optional: JUSTID
--
-- Returns {0} when the lease is not the one given, else {1, the XAUTOCLAIM reply}.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return { 0 }
end
return { 1, redis.call('XAUTOCLAIM', KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 'COUNT', ARGV[6], unpack(ARGV, 7)) }
