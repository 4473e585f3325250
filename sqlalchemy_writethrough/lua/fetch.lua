-- fetch: one round trip for a primary-key read.
-- KEYS[1] entity key, KEYS[2] generation key
-- ARGV[1] lease token ('' = the caller may not fill: no lease), ARGV[2] lease ttl ms
-- returns {1, value} hit | {0, gen} miss, lease granted | {2} miss, locked or leased by another | {3} miss, no lease asked
local v = redis.call('GET', KEYS[1])
local g = generation(KEYS[2])
if v then
  local tag = string.byte(v, 1)
  if tag == 86 then
    if value_gen(v) == g then return {1, v} end
  elseif tag == 76 or tag == 69 then
    return {2}
  end
end
if ARGV[1] == '' then
  if v then redis.call('DEL', KEYS[1]) end
  return {3}
end
redis.call('SET', KEYS[1], 'E' .. ARGV[1] .. ':' .. g, 'PX', ARGV[2])
return {0, g}
