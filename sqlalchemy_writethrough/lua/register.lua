-- register: record keyspaces (table, digest, buckets) in the registry. A field new there gives
-- the registry a new version, which every commit's publish reads: a writer whose list of the
-- registry is older then reads it again (see siblings.py). Sent with every lease's fetch and
-- every commit's lock (pipelined ahead of them), so a keyspace is in the registry before its
-- reader reads the database or its writer commits, whatever Redis forgot meanwhile.
-- KEYS[1] the registry hash, KEYS[2] its version key (same hash slot)
-- ARGV[1] the caller's process token, ARGV[2] the version the caller knows ('' none),
-- ARGV[3..] the fields
-- returns 0 when the version is still ARGV[2], else {the version, the registry's fields}: the
--   caller's new list of them, for free
local new = redis.call('EXISTS', KEYS[2]) == 0
for i = 3, #ARGV do
  if redis.call('HSET', KEYS[1], ARGV[i], 1) == 1 then new = true end
end
local version
if new then
  -- never a version seen before, even after a FLUSHALL: the server's time, the process's
  -- token, and the registry's size (which each new field grows: two in one microsecond differ)
  version = new_token(ARGV[1] .. '.' .. redis.call('HLEN', KEYS[1]))
  redis.call('SET', KEYS[2], version)
else
  version = redis.call('GET', KEYS[2])
end
if version == ARGV[2] then return 0 end
return {version, redis.call('HKEYS', KEYS[1])}
