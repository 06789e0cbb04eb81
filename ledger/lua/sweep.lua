-- Find delivery entries that vanished from their edge stream (trimmed or deleted by
-- hand) while their command still waited for the edge, so that none disappears in
-- silence even if the edge never comes back: such a command gets the `lost` verdict.
-- Walks the partition's inflight hash with HSCAN, one chunk per call.
-- KEYS: deadlines, expiries, log, inflight (as verdicts.lua)
-- ARGV: command key prefix, edge stream prefix, event id base, actor (as verdicts.lua),
--       HSCAN cursor, count, lost-from statuses, clock offset ms
-- Returns: {next cursor, fields checked, lost command_id, its edge_id, ...}
local deadlines, expiries, log, inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, stream_prefix, base, actor = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lost_from = ARGV[7]
clock_offset_ms = tonumber(ARGV[8])

local res = redis.call('HSCAN', inflight, ARGV[5], 'COUNT', tonumber(ARGV[6]))
local fields, now = res[2], nil
local out = {res[1], #fields / 2}
for i = 1, #fields, 2 do
  local field, cid = fields[i], fields[i + 1]
  local edge, id = string.match(field, '^(.+)|([^|]+)$')
  local stream = stream_prefix .. edge
  if #redis.call('XRANGE', stream, id, id) == 0 then
    local state = prefix .. cid
    if member(lost_from, redis.call('HGET', state, 'status')) then
      now = now or now_ms()
      append(state, log, event('lost', now, base .. '-l' .. i, cid, edge, actor,
        error_field('lost', 'its delivery entry ' .. id .. ' was deleted from the stream ' ..
          'before the edge acknowledged it')))
      redis.call('HSET', state, 'status', 'lost', 'lost_at', now)
      redis.call('ZREM', deadlines, cid)
      redis.call('ZREM', expiries, cid)
      out[#out + 1] = cid
      out[#out + 1] = edge
    end
    redis.call('HDEL', inflight, field)
    -- A pending entry that was deleted stays in the PEL until acknowledged.
    if redis.call('EXISTS', stream) == 1 then redis.call('XACK', stream, 'edge', id) end
  end
end
return out
