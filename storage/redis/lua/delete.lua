-- Remove one property and return its JSON (nil when it was missing), atomically.
--
-- KEYS[1]  the subject hash
-- ARGV[1]  the property's field
-- ARGV[2], ARGV[3]  the metadata fields (keys.WRITE_TOKENS_FIELD, keys.CLAIM_FIELD)
local key = KEYS[1]
local old = redis.call('HGET', key, ARGV[1])
if old then
  redis.call('HDEL', key, ARGV[1])
  -- A subject exists while it has a property: drop a hash left with nothing but metadata.
  local left = redis.call('HLEN', key)
  if left > 0 and left <= 2 then
    local meta = redis.call('HMGET', key, ARGV[2], ARGV[3])
    if (meta[1] and 1 or 0) + (meta[2] and 1 or 0) == left then
      redis.call('DEL', key)
    end
  end
end
return old
