-- invalidate: the database row may have changed outside a tracked flush (by hand, bulk DML), or
-- a journal replay after Redis was away.
-- A lock is marked contended, so neither its publish nor its rollback writes a value; anything else
-- (value, lease) is deleted, which also voids a lease so an in-flight fill is refused.
-- ARGV: owner tokens of transactions that have ended (a journal replay): they leave the locks
-- they hold, the last owner leaving a miss, as a release does; then the near cache's channel.
-- KEYS: entity key, generation key, repeated
-- returns the number of keys touched
local ended = {}
for i = 1, #ARGV - 1 do ended[ARGV[i]] = true end
local n = 0
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local v = redis.call('GET', k)
  if v then
    local lock = string.byte(v, 1) == 76 and read_lock(v) or nil
    if lock then
      local owners, left = lock[1], false
      for owner in pairs(owners) do
        if ended[owner] then owners[owner] = nil else left = true end
      end
      if not left then
        redis.call('DEL', k)
      else
        lock[2] = 1
        redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
      end
    else
      redis.call('DEL', k)
    end
    n = n + 1
  end
end
notify('k', 1, 2)
return n
