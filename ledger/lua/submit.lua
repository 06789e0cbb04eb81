-- Admit an authorized command: record issued + authorized, put it on its edge's
-- delivery stream, and mark it routed (edge online) or queued (offline).
-- KEYS: state, log, edge stream, presence, deadlines, expiries, latest, inflight,
--       edge streams set, request (this call's reply is kept there: a rerun returns
--       it, see common.lua; the gateway queues a delivery behind an admission, and a
--       lost reply reruns both), [command-id index: only on a single server, where the
--       script claims the id itself; on a cluster the caller claimed it first]
-- ARGV: command_id, edge_id, digest, issued json, authorized json, edge body,
--       expires_at ms, ack timeout ms, coalesce field, state ttl ms, event id base,
--       actor, command key prefix, clock offset ms
-- Returns: {'admitted', status, gateway, now ms, log entry ids of issued, authorized and
--           routed/queued} or {'exists' | 'duplicate' | 'stale', status or now, ''}
local state, log, stream, presence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local deadlines, expiries, latest, inflight, streams = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local cid, edge, digest = ARGV[1], ARGV[2], ARGV[3]
local expires_at = tonumber(ARGV[7])
local field = ARGV[9]
local base, actor = ARGV[11], ARGV[12]
clock_offset_ms = tonumber(ARGV[14])

local request = KEYS[10]
local earlier = replayed(request)
if earlier then return earlier end
if KEYS[11] then
  local claimed_by = redis.call('SET', KEYS[11], edge, 'NX', 'GET', 'PX', ARGV[10])
  if claimed_by and claimed_by ~= edge then return {'duplicate', '', ''} end
end
local prior = redis.call('HMGET', state, 'digest', 'status')
if prior[1] then
  if prior[1] == digest then return {'exists', prior[2], ''} end
  return {'duplicate', prior[2], ''}
end
local now = now_ms()
if now >= expires_at then return {'stale', tostring(now), ''} end

ensure_group(stream)
redis.call('SADD', streams, edge)
local entry = redis.call('XADD', stream, '*', 'id', cid, 'c', ARGV[6])
redis.call('HSET', state, 'digest', digest, 'edge', edge, 'body', ARGV[6], 'entry', entry,
  'deliveries', 0, 'expires_at', expires_at, 'issued_at', now, 'coalesce', field)
redis.call('HSET', inflight, inflight_field(edge, entry), cid)
local issued = append(state, log, stamp(ARGV[4], now))
local authorized = append(state, log, stamp(ARGV[5], now))

local owner = redis.call('GET', presence)
local status, gateway, placed = 'queued', '', ''
if owner then
  status = 'routed'
  gateway = string.match(owner, '^[^|]+')
  placed = append(state, log, event('routed', now, base .. '-r', cid, edge, actor,
    ',"gateway":"' .. gateway .. '","delivery":1'))
  redis.call('HSET', state, 'routed_at', now)
  redis.call('ZADD', deadlines, now + tonumber(ARGV[8]), cid)
else
  placed = append(state, log, event('queued', now, base .. '-q', cid, edge, actor,
    ',"expires_at":' .. expires_at))
  redis.call('ZADD', expiries, expires_at, cid)
end
if field ~= '' then
  -- Coalesce: a newer setpoint for the same channel supersedes an older one still
  -- waiting for the edge to come back (routed ones are superseded at delivery, see
  -- deliver.lua, unless they may already have reached the edge).
  local older = redis.call('HGET', latest, field)
  if older and status == 'queued' then
    local older_key = ARGV[13] .. older
    if redis.call('HGET', older_key, 'status') == 'queued' then
      append(older_key, log, event('failed', now, base .. '-s', older, edge, actor,
        error_field('superseded', 'a newer setpoint for the same channel (' .. cid ..
          ') replaced this one while the edge was offline')))
      redis.call('HSET', older_key, 'status', 'failed', 'failed_at', now)
      redis.call('ZREM', expiries, older)
    end
  end
  redis.call('HSET', latest, field, cid)
end
redis.call('HSET', state, 'status', status)
redis.call('PEXPIRE', state, ARGV[10])
return remember(request, {'admitted', status, gateway, tostring(now), issued, authorized, placed})
