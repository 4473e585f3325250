-- epoch_gens: a new epoch on one Redis Cluster node (see epoch_bump, which does this and records
-- the epoch in one script on a standalone Redis). Each generation key lies in a slot of its
-- own, so the node's keys are replaced one script call each, before epoch_bump records the
-- epoch; a bucket under a generation lock is marked contended (its last owner replaces it),
-- and an absent generation key stays absent.
-- KEYS[1] a generation key
-- ARGV[1] a random nonce
-- returns 1 when it was replaced (or marked), 0 when absent
local g = redis.call('GET', KEYS[1])
if not g then return 0 end
if gen_locked(g) then
  local lock = cmsgpack.unpack(string.sub(g, 2))
  if lock[3] == 0 then
    lock[3] = 1
    redis.call('SET', KEYS[1], 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
  end
else
  redis.call('SET', KEYS[1], new_token(ARGV[1]))
end
return 1
