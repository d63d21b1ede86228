-- Take a partition's lease when nobody holds it: the new owner's epoch, and the lease.
--
-- KEYS[1]  the partition's lease key
-- KEYS[2]  the partition's fences hash (field ARGV[1] counts its epochs)
-- ARGV[1]  the partition number
-- ARGV[2]  the new owner, '<instance>:<nonce>'
-- ARGV[3]  the lease time in milliseconds
--
-- Returns {1, lease} with lease = '<epoch>:<instance>:<nonce>', or {0, the lease held} when
-- someone holds it.  The epoch is the server's clock in milliseconds, or one more than the last
-- epoch when that is later: it only grows, even when the keys were lost (a restart without
-- persistence), so a fence never lets an older owner through.
local held = redis.call('GET', KEYS[1])
if held then
  return { 0, held }
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local epoch = string.format('%d', math.max(now, last + 1))
redis.call('HSET', KEYS[2], ARGV[1], epoch)
local lease = epoch .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], lease, 'PX', ARGV[3])
return { 1, lease }
