-- Hand an edge's deliverable commands to the gateway session that owns the edge, in
-- stream order. A new session first reclaims what an earlier one left unacknowledged
-- (XAUTOCLAIM from the `claim` cursor; the caller repeats until the cursor is 0-0),
-- then reads new entries (XREADGROUP). Along the way:
--   * entries whose command is no longer deliverable are settled (XACK), never sent;
--   * undelivered commands past their expiry get the `expired` verdict, never sent;
--     a routed one past its expiry is not resent and keeps its ack deadline;
--   * with coalesce=1 (a new session's backlog) a setpoint never handed to any session
--     is superseded when a newer one for the same device/channel is pending or done;
--   * entries deleted while pending (XAUTOCLAIM lists them) give the command `lost`.
-- KEYS: edge stream, log, presence, deadlines, expiries, inflight, latest, request
--       (this call's reply is kept there: a rerun returns it, see common.lua)
-- ARGV: edge_id, owner, claim cursor ('' = no reclaim), count, ack timeout ms,
--       command key prefix, event id base, actor, deliverable statuses,
--       lost-from statuses, coalesce (1/0), clock offset ms
-- Returns: {'ok', next claim cursor, fresh batch full (1/0), lost ids (space separated),
--           command_id, delivery count, body, ...} or {'not_owner'}
local stream, log, presence, deadlines, expiries, inflight, latest, request =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local earlier = replayed(request)
if earlier then return earlier end
local edge, owner, cursor, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local prefix, base, actor = ARGV[6], ARGV[7], ARGV[8]
local deliverable, lost_from, coalesce = ARGV[9], ARGV[10], ARGV[11] == '1'
clock_offset_ms = tonumber(ARGV[12])
-- Statuses of a newer setpoint that make an older, never-sent one pointless.
local supersedes = ' authorized queued routed delivered executed '

if redis.call('GET', presence) ~= owner then return remember(request, {'not_owner'}) end
ensure_group(stream)
local now = now_ms()
local entries, vanished = {}, {}
local next_cursor = '0-0'
if cursor ~= '' then
  repeat
    local res = redis.call('XAUTOCLAIM', stream, 'edge', edge, 0, cursor, 'COUNT', count)
    cursor = res[1]
    for _, e in ipairs(res[2]) do
      if e[2] then entries[#entries + 1] = e else vanished[#vanished + 1] = e[1] end
    end
    for _, id in ipairs(res[3] or {}) do vanished[#vanished + 1] = id end
  until cursor == '0-0' or #entries >= count
  next_cursor = cursor
end
local fresh_full = '0'
local room = count - #entries  -- the caller's flow control: never more than `count`
if next_cursor == '0-0' and room <= 0 then
  fresh_full = '1'
elseif next_cursor == '0-0' then
  local fresh = redis.call('XREADGROUP', 'GROUP', 'edge', edge, 'COUNT', room,
    'STREAMS', stream, '>')
  if fresh then
    for _, e in ipairs(fresh[1][2]) do entries[#entries + 1] = e end
    if #fresh[1][2] >= room then fresh_full = '1' end
  end
end

local out = {'ok', next_cursor, fresh_full, ''}
local lost = {}
local function settle(id)
  redis.call('XACK', stream, 'edge', id)
  redis.call('HDEL', inflight, inflight_field(edge, id))
end
local function drop_timers(cid)
  redis.call('ZREM', expiries, cid)
  redis.call('ZREM', deadlines, cid)
end
local function superseded_by(s)
  if not coalesce or s[3] ~= '0' or not s[4] or s[4] == '' then return nil end
  local newest = redis.call('HGET', latest, s[4])
  if not newest or newest == s[5] then return nil end
  if member(supersedes, redis.call('HGET', prefix .. newest, 'status')) then return newest end
  return nil
end

for i, e in ipairs(entries) do
  local id, fields = e[1], e[2]
  local cid, body = fields[2], fields[4]
  local state = prefix .. cid
  local s = redis.call('HMGET', state, 'status', 'expires_at', 'deliveries', 'coalesce')
  s[5] = cid
  local newest = member(deliverable, s[1]) and superseded_by(s)
  if not member(deliverable, s[1]) then
    settle(id)
  elseif now >= tonumber(s[2]) then
    if s[1] ~= 'routed' then
      append(state, log, event('expired', now, base .. '-x' .. i, cid, edge, actor,
        error_field('expired', 'not delivered before its expiry') .. ',"expires_at":' .. s[2]))
      redis.call('HSET', state, 'status', 'expired', 'expired_at', now)
      drop_timers(cid)
    end
    settle(id)
  elseif newest then
    append(state, log, event('failed', now, base .. '-s' .. i, cid, edge, actor,
      error_field('superseded', 'a newer setpoint for the same channel (' .. newest ..
        ') replaced this one before the edge received it')))
    redis.call('HSET', state, 'status', 'failed', 'failed_at', now)
    drop_timers(cid)
    settle(id)
  else
    local n = redis.call('HINCRBY', state, 'deliveries', 1)
    -- Routed at admission but held in the stream (the edge's in-flight bound, or its
    -- gateway went away) for a good part of the ack window: routed again now, so the
    -- ack deadline runs from the hand-out and waiting is never a timeout.
    local held = s[1] == 'routed' and n == 1 and
      now - tonumber(redis.call('HGET', state, 'routed_at') or now) >= tonumber(ARGV[5]) / 4
    if s[1] ~= 'routed' or n > 1 or held then
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
  local cid = redis.call('HGET', inflight, inflight_field(edge, id))
  if cid then
    local state = prefix .. cid
    if member(lost_from, redis.call('HGET', state, 'status')) then
      append(state, log, event('lost', now, base .. '-l' .. i, cid, edge, actor,
        error_field('lost', 'its delivery entry ' .. id .. ' was deleted from the stream ' ..
          'before the edge acknowledged it')))
      redis.call('HSET', state, 'status', 'lost', 'lost_at', now)
      drop_timers(cid)
      lost[#lost + 1] = cid
    end
  end
  settle(id)
end
out[4] = table.concat(lost, ' ')
return remember(request, out)
