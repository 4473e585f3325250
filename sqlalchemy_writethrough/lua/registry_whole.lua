-- registry_whole: make a keyspace registry Redis forgot whole again (see siblings.py).
-- The registry is whole while it holds the field '~|whole|0': Redis evicting the hash, or anyone
-- deleting it, takes the field too, and the next registration makes a hash without it, listing
-- only the keyspaces registered since. The entries of the others are still there, served by
-- the processes that read them (a hit records nothing), and commits that go by the new list
-- neither lock nor invalidate them. A recovery replaces the prefix's generation keys (found by
-- SCAN, from the client) made before the registry (its field '~|since|0', register.lua)
-- between its 'begin' and its 'end': no entry filled before the loss is served after it. An
-- entry of a generation made since was filled after a registration of its keyspace in this
-- registry (every fetch and lock registers in its pipeline, behind it: one made before the
-- registry's birth is replaced here), which commits reach (siblings.py).
-- Its own field '~|recovering.<token>.<attempt>|0' proves at 'end' that the hash was not
-- forgotten again meanwhile (that would have taken the field too); the field's value is a time,
-- so register.lua's pruning drops it if the process dies. One field per attempt, not per
-- process: two threads (or tasks) of a process share its token and its lease, and one begun on
-- a registry Redis then forgot must not find, at its 'end', the field another one's 'begin' put
-- in the registry made again (it replaced the generations made before the old birth only).
-- Only GET, SET, DEL, TIME, HGET, HSET, HDEL, HKEYS: the documented least-privilege ACL. The
-- birth '~|since|0' (microseconds) outlives register.lua's pruning, which drops a field whose
-- value is below the time in milliseconds: a time in microseconds never is.
-- KEYS[1] the registry, KEYS[2] its version key, KEYS[3] the recovery lease (same hash slot)
-- ARGV[1] 'begin' | 'renew' | 'end' | 'forget', ARGV[2] the caller's token, ARGV[3] the lease (ms),
-- ARGV[4] the caller's attempt (one per recovery a thread or task of the process begins)
-- begin: {1, version, fields} the registry is whole (1 alone when its version key is missing)
--   | 0 another process's recovery holds the lease: wait
--   | {2, since} the caller holds the lease: replace the generations made before since (microseconds),
--   then 'end'
-- renew: 2 the lease is the caller's for ARGV[3] ms more | 0 the registry was forgotten again
--   meanwhile (start again) | 1 it was made whole meanwhile
-- end: {1, version, fields} whole | 0 forgotten again meanwhile: begin again
-- forget: 1, the registry no longer whole and its birth now (a Cluster epoch, cluster.py)
local whole = '~|whole|0'
local mine = '~|recovering.' .. ARGV[2] .. '.' .. (ARGV[4] or '') .. '|0'
if ARGV[1] == 'forget' then
  -- a new epoch on a Redis Cluster node serving the registry: its failover may have lost
  -- registrations the old primary acknowledged while other nodes keep those keyspaces' entries,
  -- so the registry is not known whole any more, and counts as made now
  redis.call('HDEL', KEYS[1], whole)
  redis.call('HSET', KEYS[1], '~|since|0', string.format('%d', now_us()))
  -- a recovery under way went by the old birth: its 'end' must not call this one whole
  local fields = redis.call('HKEYS', KEYS[1])
  local left = #fields
  for _, field in ipairs(fields) do
    if string.sub(field, 1, 13) == '~|recovering.' then
      redis.call('HDEL', KEYS[1], field)
      left = left - 1
    end
  end
  redis.call('SET', KEYS[2], new_token(ARGV[2] .. '.' .. left))
  return 1
end
local ms = tonumber(ARGV[3]) or 5000
local lease = redis.call('GET', KEYS[3])
local function let_go()
  redis.call('HDEL', KEYS[1], mine)
  if lease == ARGV[2] then redis.call('DEL', KEYS[3]) end
end
-- whole: the registry as it is now, for the caller's list of it (as register.lua replies)
local function whole_now()
  local version = redis.call('GET', KEYS[2])
  if not version then return 1 end
  return {1, version, redis.call('HKEYS', KEYS[1])}
end
if redis.call('HGET', KEYS[1], whole) then
  if ARGV[1] ~= 'begin' then let_go() end
  return whole_now()
end
if ARGV[1] == 'begin' then
  if lease and lease ~= ARGV[2] then return 0 end
  -- the lease last: a script stopped on the way (an ACL refusing HSET) leaves none behind,
  -- which every process's commits would otherwise wait for until it expired
  redis.call('HSET', KEYS[1], mine, now_ms() + 4 * ms)
  local since = redis.call('HGET', KEYS[1], '~|since|0')
  if not since then  -- forgotten again since the registration that saw it missing
    since = string.format('%d', now_us())
    redis.call('HSET', KEYS[1], '~|since|0', since)
  end
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ms)
  return {2, since}
end
if not redis.call('HGET', KEYS[1], mine) then
  let_go()
  return 0
end
if ARGV[1] == 'renew' then
  if not lease or lease == ARGV[2] then
    redis.call('SET', KEYS[3], ARGV[2], 'PX', ms)
  end
  redis.call('HSET', KEYS[1], mine, now_ms() + 4 * ms)
  return 2
end
let_go()
redis.call('HSET', KEYS[1], whole, '9007199254740991')
-- a new version: every process's next registration or publish reads the whole list
local fields = redis.call('HKEYS', KEYS[1])
local version = new_token(ARGV[2] .. '.' .. #fields)
redis.call('SET', KEYS[2], version)
return {1, version, fields}
