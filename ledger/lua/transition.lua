-- Compare-and-set one lifecycle transition and append its event. The caller passes
-- the statuses it may follow, computed by the pure state machine (ledger/lifecycle.py).
-- KEYS: state, log, edge stream, deadlines, expiries, inflight, request (this call's
--       reply is kept there: a rerun returns it, see common.lua)
-- ARGV: to status, allowed-from set, event json, edge_id ('' = any), settle (1 = XACK
--       the delivery entry), terminal (1 = drop deadlines), late-from set, state ttl ms,
--       command_id, clock offset ms
-- Returns: {'ok', previous status, late (1/0), now ms, the command's log entry before
--           this event ('' if unknown), this event's entry} or {'refused', status} or
--           {'unknown', ''}
local state, log, stream, deadlines, expiries, inflight, request =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local earlier = replayed(request)
if earlier then return earlier end
local to, cid = ARGV[1], ARGV[9]
clock_offset_ms = tonumber(ARGV[10])
local cur = redis.call('HMGET', state, 'status', 'edge', 'entry', 'last')
if not cur[1] then return {'unknown', ''} end
if ARGV[4] ~= '' and cur[2] ~= ARGV[4] then return {'unknown', ''} end
if not member(ARGV[2], cur[1]) then return {'refused', cur[1]} end

local now = now_ms()
local json = stamp(ARGV[3], now)
local late = member(ARGV[7], cur[1])
if late then
  json = string.sub(json, 1, -2) .. ',"late":true}'
  redis.call('HSET', state, 'late', 1)
end
local id = append(state, log, json)
redis.call('HSET', state, 'status', to, to .. '_at', now)
if ARGV[5] == '1' and cur[3] then
  redis.call('XACK', stream, 'edge', cur[3])
  redis.call('HDEL', inflight, inflight_field(cur[2], cur[3]))
end
redis.call('ZREM', expiries, cid)
if ARGV[6] == '1' then redis.call('ZREM', deadlines, cid) end
redis.call('PEXPIRE', state, ARGV[8])
return remember(request, {'ok', cur[1], late and '1' or '0', tostring(now), cur[4] or '', id})
