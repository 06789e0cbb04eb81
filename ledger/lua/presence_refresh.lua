-- Extend the presence of many edges of one partition at once (their keys share a slot),
-- each only while the session that holds it is still its owner.
-- KEYS: presence of each edge
-- ARGV: ttl ms, then the owner each session holds, in KEYS order
-- Returns: per key, 1 when extended, 0 when the edge has another owner or none now
local ttl = ARGV[1]
local owned = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ttl)
    owned[i] = 1
  else
    owned[i] = 0
  end
end
return owned
