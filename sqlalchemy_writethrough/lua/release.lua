-- release: after ROLLBACK. Puts back the previous VALUE where this transaction held the only,
-- uncontended lock and the generation has not moved; otherwise drops ownership, the last owner
-- leaving a miss.
-- KEYS: entity key, generation key, repeated
-- ARGV[1] owner token, ARGV[2] near channel
-- returns the number of previous values restored
local owner = ARGV[1]
local restored = 0
local now = nil
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local v = redis.call('GET', k)
  local lock = (v and string.byte(v, 1) == 76) and read_lock(v) or nil
  if v and string.byte(v, 1) == 76 and lock == nil then
    redis.call('DEL', k)  -- damaged
  elseif lock then
    local owners = lock[1]
    if owners[owner] then
      owners[owner] = nil
      if next(owners) == nil then
        local done = false
        local g = current_gen(KEYS[i + 1])
        if lock[2] == 0 and lock[3] and g == lock[5] and not gen_locked(g) then
          now = now or now_ms()
          if lock[4] - now > 0 then
            redis.call('SET', k, lock[3], 'PXAT', string.format('%d', lock[4]))
            restored = restored + 1
            done = true
          end
        end
        if not done then redis.call('DEL', k) end
      else
        lock[2] = 1
        redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
      end
    end
  end
end
notify('k', 1, 2)
return restored
