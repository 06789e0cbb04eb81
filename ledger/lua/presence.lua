-- Edge session presence. op=connect: take ownership (returns the previous owner and
-- tells it through the partition's wake stream); op=refresh: extend the TTL if still
-- the owner; op=disconnect: release if still the owner.
-- KEYS: presence, wake
-- ARGV: op, owner, ttl ms, edge_id
local presence, wake = KEYS[1], KEYS[2]
local op, owner = ARGV[1], ARGV[2]
local current = redis.call('GET', presence)
if op == 'connect' then
  redis.call('SET', presence, owner, 'PX', ARGV[3])
  if current and current ~= owner then
    redis.call('XADD', wake, 'MAXLEN', '~', 1000, '*', 'kind', 'replaced', 'edge', ARGV[4],
      'owner', current, 'by', owner)
  end
  return current or ''
elseif op == 'refresh' then
  if current ~= owner then return 0 end
  redis.call('PEXPIRE', presence, ARGV[3])
  return 1
else
  if current ~= owner then return 0 end
  redis.call('DEL', presence)
  return 1
end
