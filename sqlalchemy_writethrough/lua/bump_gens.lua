-- bump_gens: invalidate whole buckets now (cache.invalidate(Model), a journal replay, a
-- forgotten registry made whole again).
-- A bucket under a generation lock is marked contended instead: its last owner writes the new
-- token when it ends, whether it commits or rolls back.
-- KEYS: generation keys
-- ARGV[1] a random nonce, [ARGV[2] a server time in microseconds: only the generations made
-- before it are replaced, and an absent one stays absent (registry_whole.lua)], ARGV[last]
-- near channel
-- returns the number of generations replaced now
local before = nil
if #ARGV > 2 then before = tonumber(ARGV[2]) end
local bumped = 0
for i = 1, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if g and gen_locked(g) then
    local lock = cmsgpack.unpack(string.sub(g, 2))
    if lock[3] == 0 then
      lock[3] = 1
      redis.call('SET', KEYS[i], 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
    end
  elseif before == nil or (g and made_before(g, before)) then
    redis.call('SET', KEYS[i], new_token(ARGV[1]))
    bumped = bumped + 1
  end
end
if bumped > 0 or before == nil then notify('g', 1, 1) end
return bumped
