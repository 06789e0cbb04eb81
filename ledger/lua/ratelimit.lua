-- GCRA rate limits over several scopes at once (user, edge, global), all or nothing:
-- the request is admitted only if every scope admits it, and only then is each scope
-- charged. A refused request charges nothing, so a flood of refused requests does not
-- push the retry time further out. Time is the Redis server clock, in milliseconds
-- with microsecond precision.
-- KEYS: one limiter key per scope (all share the {rl} hash tag)
-- ARGV: per key, in order: emission interval ms (1000 / rate), burst
-- Returns {0, "0"} when admitted, else {index of the scope that refused the longest,
-- milliseconds until it would admit, as a string}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local new_tat = {}
local worst, worst_wait = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local next_tat = tat + interval
  local wait = next_tat - interval * burst - now
  if wait > 0 then
    if wait > worst_wait then worst, worst_wait = i, wait end
  end
  new_tat[i] = next_tat
end
if worst > 0 then
  return {worst, string.format('%.3f', worst_wait)}
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.3f', new_tat[i]),
    'PX', math.ceil(new_tat[i] - now) + 1000)
end
return {0, '0'}
