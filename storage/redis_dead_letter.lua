-- Park a stream entry in its partition's dead-letter stream and acknowledge it, at once.
--
-- KEYS[1]  the partition's stream
-- KEYS[2]  the partition's dead-letter stream (same partition, hence same cluster slot)
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry's id
-- ARGV[3...]  the dead-letter entry's fields and values, in pairs
--
-- Returns 1 when parked, 0 when the entry was no longer pending (parked or acknowledged before,
-- e.g. by this call whose reply was lost): nothing is written twice.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return 1
