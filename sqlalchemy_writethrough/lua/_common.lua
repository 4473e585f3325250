-- Shared helpers, prepended to every script by protocol.py (Redis has no `require`).
-- Entry states (first byte of the value):
--   'V' .. gen .. ':' .. payload   VALUE: a committed row, valid while gen equals the bucket generation
--   'L' .. msgpack{owners, contended, prev, prev_expire_ms, gen}   LOCK taken by writers before COMMIT
--   'E' .. token .. ':' .. gen     LEASE: only the holder of token may fill
-- The generation key of a bucket holds an opaque token; it is created on first use and replaced
-- (never incremented) by a whole-model invalidation, so a lost generation key cannot revive old entries.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function generation(gkey)
  local g = redis.call('GET', gkey)
  if not g then
    local t = redis.call('TIME')
    g = 't' .. t[1] .. '.' .. t[2]
    redis.call('SET', gkey, g)
  end
  return g
end

local function value_gen(v)
  local sep = string.find(v, ':', 2, true)
  if not sep then return nil end
  return string.sub(v, 2, sep - 1)
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end
