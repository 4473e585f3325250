-- publish: after COMMIT. Writes the new VALUE only where this transaction still holds the only,
-- uncontended lock and the generation has not moved; everywhere else it leaves a miss.
-- KEYS: entity key, generation key, repeated
-- ARGV[1] owner token; then per pair: payload ('' = leave a miss), ttl ms; last: near channel
-- returns the number of values written
local owner = ARGV[1]
local written = 0
for j = 1, #KEYS / 2 do
  local k, gk = KEYS[2 * j - 1], KEYS[2 * j]
  local payload, ttl = ARGV[2 * j], ARGV[2 * j + 1]
  local v = redis.call('GET', k)
  local lock = (v and string.byte(v, 1) == 76) and read_lock(v) or nil
  if lock then
    local owners = lock[1]
    if owners[owner] then
      owners[owner] = nil
      if next(owners) == nil then
        local g = current_gen(gk)
        if lock[2] == 0 and payload ~= '' and g == lock[5] and not gen_locked(g) then
          redis.call('SET', k, 'V' .. g .. ':' .. payload, 'PX', ttl)
          written = written + 1
        else
          redis.call('DEL', k)
        end
      else
        lock[2] = 1
        redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
      end
    elseif lock[2] == 0 then
      -- another writer locked after ours was lost: its prev may predate our commit
      lock[2] = 1
      redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
    end
  elseif v then
    -- our lock is gone (expired, evicted, restarted): what is here may predate our commit
    redis.call('DEL', k)
  end
end
notify('k', 1, 2)
return written
