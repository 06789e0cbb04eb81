-- Hand an edge's deliverable commands to the gateway session that owns the edge:
-- with claim=1 (a new session) first reclaim what an earlier session left
-- unacknowledged (XAUTOCLAIM), then read new entries (XREADGROUP). Commands that are
-- no longer deliverable are settled (XACK), expired ones get their verdict, entries
-- that vanished (trimmed while pending) get a `lost` verdict.
-- KEYS: edge stream, log, presence, deadlines, expiries, inflight
-- ARGV: edge_id, owner, claim, count, ack timeout ms, command key prefix,
--       event id base, actor, deliverable statuses, final statuses
local stream, log, presence, deadlines, expiries, inflight =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local edge, owner, count = ARGV[1], ARGV[2], tonumber(ARGV[4])
local prefix, base, actor = ARGV[6], ARGV[7], ARGV[8]
local deliverable, final = ARGV[9], ARGV[10]

if redis.call('GET', presence) ~= owner then return {'not_owner'} end
ensure_group(stream)
local now = now_ms()
local entries, vanished = {}, {}
if ARGV[3] == '1' then
  local cursor = '0-0'
  repeat
    local res = redis.call('XAUTOCLAIM', stream, 'edge', edge, 0, cursor, 'COUNT', count)
    cursor = res[1]
    for _, e in ipairs(res[2]) do
      if e[2] then entries[#entries + 1] = e else vanished[#vanished + 1] = e[1] end
    end
    for _, id in ipairs(res[3] or {}) do vanished[#vanished + 1] = id end
  until cursor == '0-0' or #entries >= count
end
local fresh = redis.call('XREADGROUP', 'GROUP', 'edge', edge, 'COUNT', count,
  'STREAMS', stream, '>')
if fresh then
  for _, e in ipairs(fresh[1][2]) do entries[#entries + 1] = e end
end

local out = {'ok'}
local function settle(id)
  redis.call('XACK', stream, 'edge', id)
  redis.call('HDEL', inflight, id)
end
for i, e in ipairs(entries) do
  local id, fields = e[1], e[2]
  local cid, body = fields[2], fields[4]
  local state = prefix .. cid
  local s = redis.call('HMGET', state, 'status', 'expires_at')
  if not member(deliverable, s[1]) then
    settle(id)
  elseif now >= tonumber(s[2]) then
    append(state, log, event('expired', now, base .. '-x' .. i, cid, edge, actor,
      error_field('expired', 'not delivered before its expiry') .. ',"expires_at":' .. s[2]))
    redis.call('HSET', state, 'status', 'expired')
    redis.call('ZREM', expiries, cid)
    redis.call('ZREM', deadlines, cid)
    settle(id)
  else
    local n = redis.call('HINCRBY', state, 'deliveries', 1)
    if s[1] ~= 'routed' or n > 1 then
      append(state, log, event('routed', now, base .. '-r' .. i, cid, edge, actor,
        ',"gateway":"' .. string.match(owner, '^[^|]+') .. '","delivery":' .. n))
      redis.call('HSET', state, 'status', 'routed', 'routed_at', now)
      redis.call('ZADD', deadlines, now + tonumber(ARGV[5]), cid)
    end
    redis.call('ZREM', expiries, cid)
    out[#out + 1] = cid
    out[#out + 1] = n
    out[#out + 1] = body
  end
end
for i, id in ipairs(vanished) do
  local cid = redis.call('HGET', inflight, id)
  if cid then
    local state = prefix .. cid
    local status = redis.call('HGET', state, 'status')
    if status and not member(final, status) then
      append(state, log, event('lost', now, base .. '-l' .. i, cid, edge, actor,
        error_field('lost', 'its delivery entry was deleted from the stream before the edge acknowledged it')))
      redis.call('HSET', state, 'status', 'lost')
      redis.call('ZREM', deadlines, cid)
      redis.call('ZREM', expiries, cid)
    end
  end
  settle(id)
end
return out
