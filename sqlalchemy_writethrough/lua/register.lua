-- register: record keyspaces (table, digest, buckets) in the registry. A field new there gives
-- the registry a new version (a nonce), which every commit's publish reads: a writer whose list
-- of the registry is older then reads it again (see siblings.py). Sent with every lease's fetch
-- and every commit's lock (pipelined before them), so a keyspace is in the registry before its
-- reader reads the database or its writer commits, whatever Redis forgot meanwhile.
-- KEYS[1] the registry hash, KEYS[2] its version key (same hash slot)
-- ARGV[1] a new nonce, ARGV[2] the version the caller knows ('' none), ARGV[3..] the fields
-- returns {the version} when it is still ARGV[2], else {the version, the registry's fields}:
--   the caller's new list of them, for free
local new = redis.call('EXISTS', KEYS[2]) == 0
for i = 3, #ARGV do
  if redis.call('HSET', KEYS[1], ARGV[i], 1) == 1 then new = true end
end
if new then redis.call('SET', KEYS[2], ARGV[1]) end
local version = redis.call('GET', KEYS[2])
if version == ARGV[2] then return {version} end
return {version, redis.call('HKEYS', KEYS[1])}
