-- Make a partition's new epoch known in another partition's slot: writes on behalf of turns of
-- that partition carrying an older epoch are refused there from now on (lua/store.lua, append.lua).
--
-- KEYS[1]  the fences hash of the slot
-- ARGV[1]  the partition number
-- ARGV[2]  its new epoch
local known = redis.call('HGET', KEYS[1], ARGV[1])
if not known or tonumber(known) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
