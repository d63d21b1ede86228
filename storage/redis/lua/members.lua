-- Keep this instance's registration in the instances hash, with the server's clock, and return
-- every registration (those not refreshed for ARGV[4] ms are removed first).
--
-- KEYS[1]  the instances hash
-- ARGV[1]  this instance's name
-- ARGV[2]  its registration: a JSON object whose last character is the closing brace; the script
--          adds "seen" (the server's clock, in ms) before it
-- ARGV[3]  its nonce (which this process writes in the registration)
-- ARGV[4]  forget registrations older than this many ms
-- ARGV[5]  '1' to leave: remove the registration (if it is this process's) instead
--
-- Returns {now, the registration found under this name before ('' for none), name, JSON, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if ARGV[5] == '1' then
  if string.find(before, ARGV[3], 1, true) then
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
else
  local mine = string.sub(ARGV[2], 1, -2) .. ',"seen":' .. string.format('%d', now) .. '}'
  redis.call('HSET', KEYS[1], ARGV[1], mine)
end
local all = redis.call('HGETALL', KEYS[1])
local out = { string.format('%d', now), before }
local oldest = now - tonumber(ARGV[4])
for i = 1, #all, 2 do
  local seen = tonumber(string.match(all[i + 1], '"seen":%s*(%d+)') or '0')
  if seen < oldest then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
