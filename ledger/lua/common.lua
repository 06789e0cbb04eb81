-- Prepended to every script. Every key a script touches shares the partition's hash
-- tag, so each script is one atomic step even on Redis Cluster.

-- Scripts of the ledger take a clock offset (ms) as their last ARGV and set this. It
-- is 0 in production; tests shift time with it because Redis TIME cannot be advanced.
local clock_offset_ms = 0

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + clock_offset_ms
end

-- Insert the Redis server time right after the event's tag field.
local function stamp(json, at)
  local tag_end = string.find(json, ',', 1, true)
  return string.sub(json, 1, tag_end) .. '"at":' .. at .. ',' .. string.sub(json, tag_end + 1)
end

-- An event built here (verdicts, redeliveries); ids come from the safe alphabet.
local function event(status, at, event_id, command_id, edge_id, actor, extra)
  return '{"status":"' .. status .. '","at":' .. at .. ',"event_id":"' .. event_id ..
    '","command_id":"' .. command_id .. '","edge_id":"' .. edge_id ..
    '","actor":"' .. actor .. '"' .. (extra or '') .. '}'
end

local function error_field(code, message)
  return ',"error":{"code":"' .. code .. '","message":"' .. message .. '"}'
end

-- Append to the partition log and to the command's own event list; returns the log
-- entry id. `last` keeps the command's newest entry id: a gateway that answers from a
-- script's reply (before its log tail brings the event) checks against it that it has
-- sent every earlier status of the command (gateway/direct.py).
local function append(state, log, json)
  local id = redis.call('XADD', log, '*', 'e', json)
  local prior = redis.call('HGET', state, 'events')
  if prior then
    redis.call('HSET', state, 'events', prior .. '\n' .. json, 'last', id)
  else
    redis.call('HSET', state, 'events', json, 'last', id)
  end
  return id
end

local function ensure_group(stream)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, 'edge', '0', 'MKSTREAM')
  end
end

-- `list` is a space-delimited set with spaces at both ends: ' queued routed '.
local function member(list, value)
  return value ~= nil and value ~= false and string.find(list, ' ' .. value .. ' ', 1, true) ~= nil
end

-- Field of the partition's inflight hash: entry ids are unique per stream only, and
-- several edges' streams share one partition.
local function inflight_field(edge, entry)
  return edge .. '|' .. entry
end

-- Stream ids compare as (ms, seq) pairs.
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

-- A reply lost on the way back makes redis-py resend the whole pipeline: a script that
-- takes a request key answers a rerun with its first run's reply (kept briefly under
-- that key) instead of doing the work twice.
local function replayed(key)
  local prior = redis.call('GET', key)
  if prior then return cjson.decode(prior) end
  return nil
end

local function remember(key, reply)
  redis.call('SET', key, cjson.encode(reply), 'PX', 30000)
  return reply
end
