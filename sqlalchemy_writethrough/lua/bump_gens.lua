-- bump_gens: invalidate whole buckets now (cache.invalidate(Model), a journal replay).
-- A bucket under a generation lock is marked contended instead: its last owner writes the new
-- token when it ends, whether it commits or rolls back.
-- KEYS: generation keys
-- ARGV[1] a random nonce, ARGV[2] near channel
-- returns the number of generations replaced now
local bumped = 0
for i = 1, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if g and gen_locked(g) then
    local lock = cmsgpack.unpack(string.sub(g, 2))
    if lock[3] == 0 then
      lock[3] = 1
      redis.call('SET', KEYS[i], 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
    end
  else
    redis.call('SET', KEYS[i], new_token(ARGV[1]))
    bumped = bumped + 1
  end
end
notify('g', 1, 1)
return bumped
