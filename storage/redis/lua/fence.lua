-- Make partitions' new epochs known in another partition's slot: writes on behalf of turns of
-- those partitions carrying older epochs are refused there from now on (lua/store.lua, append.lua).
--
-- KEYS[1]  the fences hash of the slot
-- ARGV     pairs: a partition number, its new epoch
for i = 1, #ARGV, 2 do
  local known = redis.call('HGET', KEYS[1], ARGV[i])
  if not known or tonumber(known) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
