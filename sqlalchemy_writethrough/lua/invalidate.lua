-- invalidate: the database row may have changed outside a tracked flush (by hand, bulk DML).
-- A lock is marked contended, so neither its publish nor its rollback writes a value; anything else
-- (value, lease) is deleted, which also voids a lease so an in-flight fill is refused.
-- KEYS: entity key, generation key, repeated
-- returns the number of keys touched
local n = 0
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local v = redis.call('GET', k)
  if v then
    local lock = string.byte(v, 1) == 76 and read_lock(v) or nil
    if lock then
      if lock[2] == 0 then
        lock[2] = 1
        redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
      end
    else
      redis.call('DEL', k)
    end
    n = n + 1
  end
end
return n
