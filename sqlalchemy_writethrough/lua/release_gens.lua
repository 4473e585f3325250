-- release_gens: the end of a transaction that held generation locks.
-- KEYS: generation keys
-- ARGV[1] owner token, ARGV[2] '1' after COMMIT, '0' after ROLLBACK, ARGV[3] a random nonce,
-- ARGV[4] near channel
-- After COMMIT the last owner writes a new token: every older entry of the bucket is a miss.
-- After ROLLBACK an uncontended sole owner puts the previous token back (nothing changed); a
-- contended lock (another owner committed meanwhile) gets a new token from its last owner.
-- A lock lost (expired) means the key was recreated; after COMMIT it is replaced regardless, as
-- entries filled meanwhile may predate the commit.
-- returns the number of generations replaced
local owner, committed, nonce = ARGV[1], ARGV[2] == '1', ARGV[3]
local bumped = 0
for i = 1, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if g and gen_locked(g) then
    local lock = cmsgpack.unpack(string.sub(g, 2))
    local owners = lock[1]
    if owners[owner] then
      owners[owner] = nil
      if next(owners) == nil then
        if committed or lock[3] == 1 or not lock[2] then
          redis.call('SET', KEYS[i], new_token(nonce))
          bumped = bumped + 1
        else
          redis.call('SET', KEYS[i], lock[2])
        end
      else
        if committed then lock[3] = 1 end
        redis.call('SET', KEYS[i], 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
      end
    elseif committed then
      lock[3] = 1
      redis.call('SET', KEYS[i], 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
    end
  elseif committed then
    redis.call('SET', KEYS[i], new_token(nonce))
    bumped = bumped + 1
  end
end
notify('g', 1, 1)
return bumped
