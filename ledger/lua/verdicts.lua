-- Reach due verdicts for one partition: `timed_out` for routed commands without an
-- acknowledgment by their deadline (counted from when they were sent), `expired` for undelivered ones past expiry. Each
-- command gets exactly one verdict: the ZREM and the status check are atomic here, so
-- any number of workers may call this for the same partition at the same time.
-- KEYS: deadlines, expiries, log, inflight
-- ARGV: command key prefix, edge stream prefix, event id base, actor (as sweep.lua),
--       limit, ack timeout ms, timeout-from statuses, expire-from statuses, clock offset ms
-- Returns: {verdicts reached, entries examined}
local deadlines, expiries, log, inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, stream_prefix, base, actor = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
clock_offset_ms = tonumber(ARGV[9])
local now = now_ms()
local reached, examined = 0, 0

for i, cid in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, limit)) do
  examined = examined + 1
  redis.call('ZREM', deadlines, cid)
  local state = prefix .. cid
  local s = redis.call('HMGET', state, 'status', 'edge', 'entry', 'routed_at', 'deliveries',
    'expires_at')
  if s[1] == 'routed' and s[5] == '0' and now < tonumber(s[6] or 0) then
    -- Routed at admission but still waiting in the stream (the edge's in-flight bound
    -- held it back, or its gateway went away): no ack is due before it is sent, and
    -- the hand-out routes it again (deliver.lua).
    redis.call('ZADD', deadlines, now + tonumber(ARGV[6]), cid)
  elseif member(ARGV[7], s[1]) then
    append(state, log, event('timed_out', now, base .. '-t' .. i, cid, s[2], actor,
      error_field('timeout', 'no acknowledgment from the edge within ' .. ARGV[6] ..
        ' ms of routing') .. ',"routed_at":' .. (s[4] or 0)))
    redis.call('HSET', state, 'status', 'timed_out', 'timed_out_at', now)
    if s[3] then
      redis.call('XACK', stream_prefix .. s[2], 'edge', s[3])
      redis.call('HDEL', inflight, inflight_field(s[2], s[3]))
    end
    reached = reached + 1
  end
end

for i, cid in ipairs(redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, limit)) do
  examined = examined + 1
  redis.call('ZREM', expiries, cid)
  local state = prefix .. cid
  local s = redis.call('HMGET', state, 'status', 'edge', 'expires_at')
  if member(ARGV[8], s[1]) then
    append(state, log, event('expired', now, base .. '-x' .. i, cid, s[2], actor,
      error_field('expired', 'not delivered before its expiry') .. ',"expires_at":' .. s[3]))
    redis.call('HSET', state, 'status', 'expired', 'expired_at', now)
    redis.call('ZREM', deadlines, cid)
    reached = reached + 1
  end
end
return {reached, examined}
