-- Trim one stream (a partition log, the audit stream or an edge's delivery stream)
-- with XTRIM MINID, never below what any reader still needs:
--   * every consumer group's oldest pending entry and its last-delivered id (Redis
--     trims delivered-but-unacknowledged entries without a word otherwise);
--   * `keep_from`, the caller's external floor (what the projector has stored);
--   * the retention window: entries younger than `retain_ms` stay for replay.
-- On an edge stream, the `edge` group first skips unread entries at its head whose
-- command can no longer be sent (expired, cancelled, superseded): an edge that never
-- returns does not pin its stream forever.
-- KEYS: stream, inflight (edge streams; the stream again otherwise)
-- ARGV: keep_from id ('+' = no external floor), retain ms, edge_id ('' = not an edge
--       stream), command key prefix, deliverable statuses, skip limit, clock offset ms
-- Returns: {entries trimmed, floor id used, entries skipped}
local stream, inflight = KEYS[1], KEYS[2]
local keep_from, retain_ms, edge = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local prefix, deliverable, skip_limit = ARGV[4], ARGV[5], tonumber(ARGV[6])
clock_offset_ms = tonumber(ARGV[7])

if redis.call('EXISTS', stream) == 0 then return {0, '', 0} end
local floor = tostring(math.max(0, now_ms() - retain_ms)) .. '-0'
if keep_from ~= '+' and id_less(keep_from, floor) then floor = keep_from end

local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return {0, '', 0} end -- nobody has read anything yet: keep all
local skipped = 0
for _, flat in ipairs(groups) do
  local g = {}
  for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
  local last = g['last-delivered-id']
  if edge ~= '' and g['name'] == 'edge' then
    local ahead = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', skip_limit)
    local to = nil
    for _, e in ipairs(ahead) do
      if member(deliverable, redis.call('HGET', prefix .. e[2][2], 'status')) then break end
      to = e[1]
      redis.call('HDEL', inflight, inflight_field(edge, e[1]))
      skipped = skipped + 1
    end
    if to then
      redis.call('XGROUP', 'SETID', stream, 'edge', to)
      last = to
    end
  end
  if id_less(last, floor) then floor = last end
  if tonumber(g['pending']) > 0 then
    local oldest = redis.call('XPENDING', stream, g['name'])[2]
    if id_less(oldest, floor) then floor = oldest end
  end
end
return {redis.call('XTRIM', stream, 'MINID', floor), floor, skipped}
