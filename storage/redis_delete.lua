-- Remove one property and return its JSON (nil when it was missing), atomically.
--
-- KEYS[1]  the subject hash
-- ARGV[1]  the property's field; ARGV[2] the write-token field (keys.WRITE_TOKENS_FIELD)
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  redis.call('HDEL', KEYS[1], ARGV[1])
  -- A subject exists while it has a property: drop a hash left with nothing but its tokens.
  if redis.call('HLEN', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
    redis.call('DEL', KEYS[1])
  end
end
return old
