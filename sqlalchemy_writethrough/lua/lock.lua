-- lock: taken at flush, before COMMIT; re-asserted just before COMMIT.
-- KEYS: entity key, generation key, repeated (all pairs in one hash slot on Cluster)
-- ARGV[1] owner token (one per root transaction), ARGV[2] lock ttl ms; then, optionally, one
-- expected payload per pair ('' = none); last: near channel
-- A lock keeps the VALUE it replaced (prev) so a rollback can put it back; a second owner marks it contended.
-- An expected payload (the row as the writer loaded it, when its UPDATE leaves loaded columns
-- unwritten, so its publish takes them from memory): a new lock is contended (the publish leaves
-- a miss) unless it replaces a current VALUE holding exactly that payload; any other entry (none,
-- another generation, a lease, a mismatch) means a commit may have changed those columns since.
-- returns {the number of keys locked, the server time (microseconds) the newest of their
--   generations was made at (0: none of a known form)}: on a Cluster, a generation made after
--   the registration that went with the lock (backend.py, Registration)
local owner, ttl = ARGV[1], ARGV[2]
local expecting = #ARGV > 3
local now = nil
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local v = redis.call('GET', k)
  local g = generation_once(KEYS[i + 1])
  local lock
  if v and string.byte(v, 1) == 76 then
    lock = read_lock(v)
    if lock == nil then
      lock = {{[owner] = 1}, 1, false, false, g}  -- damaged: start over, never restore
    elseif not lock[1][owner] then
      lock[1][owner] = 1
      lock[2] = 1
    end
  else
    local prev, prev_at = false, false
    local current = v and string.byte(v, 1) == 86 and value_gen(v) == g
    if current then
      local pttl = redis.call('PTTL', k)
      if pttl > 0 then
        now = now or now_ms()
        prev, prev_at = v, now + pttl
      end
    end
    local contended = 0
    if expecting then
      local expected = ARGV[2 + (i + 1) / 2]
      if expected ~= '' and not (current and string.sub(v, #g + 3) == expected) then
        contended = 1
      end
    end
    lock = {{[owner] = 1}, contended, prev, prev_at, g}
  end
  redis.call('SET', k, 'L' .. cmsgpack.pack(lock), 'PX', ttl)
end
notify('k', 1, 2)
local newest = 0
for _, g in pairs(gens_seen) do
  local made = g and token_us(g)
  if made and made > newest then newest = made end
end
return {#KEYS / 2, newest}
