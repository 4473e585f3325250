-- fetch: one round trip for a primary-key read.
-- KEYS[1] entity key, KEYS[2] generation key
-- ARGV[1] lease token ('' = the caller may not fill: no lease), ARGV[2] lease ttl ms
-- returns {1, value} hit | {0, gen} miss, lease granted | {2, 'E'} miss, another reader is
--   filling | {2, 'L'} miss, locked by a writer (or the whole bucket by a generation lock)
--   | {3} miss, no lease asked
--   | {4, gen or ''} miss: the entry was damaged and has been replaced (by a lease when asked)
local v = redis.call('GET', KEYS[1])
local g = generation(KEYS[2])
if gen_locked(g) then return {2, 'L'} end
local status = 0
if v then
  if damaged(KEYS[1], v) then
    status = 4
  else
    local tag = string.byte(v, 1)
    if tag == 86 then
      if value_gen(v) == g then return {1, v} end
    elseif tag == 69 then
      return {2, 'E'}
    else
      return {2, 'L'}
    end
  end
end
if ARGV[1] == '' then
  if v then redis.call('DEL', KEYS[1]) end
  if status == 4 then return {4, ''} end
  return {3}
end
redis.call('SET', KEYS[1], 'E' .. ARGV[1] .. ':' .. g, 'PX', ARGV[2])
return {status, g}
