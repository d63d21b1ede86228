-- Store one property and return the JSON it replaced (nil when it was missing), atomically.
--
-- KEYS[1]  the subject hash
-- ARGV[1]  the property's field; ARGV[2] its new JSON
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old
