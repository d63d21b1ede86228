-- Append an entry to a partition's stream on behalf of a turn of partition q, unless a newer owner
-- of q started (the entry would come from a turn that is no longer q's owner's).
--
-- KEYS[1]  the fences hash of the stream's slot
-- KEYS[2]  the stream
-- ARGV[1]  '<q>:<epoch>'
-- ARGV[2..] the entry's fields and values
--
-- Returns {1, entry id}, or {0} when refused.
local sep = string.find(ARGV[1], ':', 1, true)
local newest = redis.call('HGET', KEYS[1], string.sub(ARGV[1], 1, sep - 1))
if newest and tonumber(newest) > tonumber(string.sub(ARGV[1], sep + 1)) then
  return { 0 }
end
return { 1, redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2)) }
