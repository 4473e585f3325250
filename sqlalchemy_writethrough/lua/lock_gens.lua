-- lock_gens: before a statement that changes rows the cache cannot name, every bucket of the
-- model is locked, so that no entry is served or filled until the transaction ends.
-- KEYS: generation keys (one call per hash slot on Cluster)
-- ARGV[1] owner token, ARGV[2] lock ttl ms, ARGV[3] near channel
-- returns the number of generation keys locked
local owner, ttl = ARGV[1], ARGV[2]
for i = 1, #KEYS do
  local g = redis.call('GET', KEYS[i])
  local lock
  if g and gen_locked(g) then
    lock = cmsgpack.unpack(string.sub(g, 2))
    if not lock[1][owner] then
      lock[1][owner] = 1
      lock[3] = 1
    end
  else
    lock = {{[owner] = 1}, g or false, 0}
  end
  redis.call('SET', KEYS[i], 'L' .. cmsgpack.pack(lock), 'PX', ttl)
end
notify('g', 1, 1)
return #KEYS
