-- Renew (or give up) a partition's lease, if it is still the one given.
--
-- KEYS[1]  the partition's lease key
-- ARGV[1]  the lease as its owner holds it ('<epoch>:<instance>:<nonce>')
-- ARGV[2]  the lease time in milliseconds, or 0 to give the lease up
--
-- Returns {1} when the lease was the one given (renewed, or deleted), else {0, the lease held}
-- ({0} when it expired and nobody took it).
local held = redis.call('GET', KEYS[1])
if held ~= ARGV[1] then
  return { 0, held }
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return { 1 }
