-- register: record keyspaces (table, digest, buckets) in the registry. A field new there gives
-- the registry a new version, which every commit's publish reads: a writer whose list of the
-- registry is older then reads it again (see siblings.py). Sent with every lease's fetch and
-- every commit's lock (pipelined ahead of them), so a keyspace is in the registry before its
-- reader reads the database or its writer commits, whatever Redis forgot meanwhile.
-- Only GET, SET, HSET, HKEYS and TIME: the documented least-privilege ACL (running-redis.md).
-- KEYS[1] the registry hash, KEYS[2] its version key (same hash slot)
-- ARGV[1] the caller's process token, ARGV[2] the version the caller knows ('' none),
-- ARGV[3..] the fields
-- returns 0 when the version is still ARGV[2], else {the version, the registry's fields}: the
--   caller's new list of them, for free
local version = redis.call('GET', KEYS[2])
local new = not version
for i = 3, #ARGV do
  if redis.call('HSET', KEYS[1], ARGV[i], 1) == 1 then new = true end
end
if new then
  -- never a version seen before, even after a FLUSHALL: the server's time, the process's
  -- token, and the registry's size (which each new field grows: two in one microsecond differ)
  local fields = redis.call('HKEYS', KEYS[1])
  version = new_token(ARGV[1] .. '.' .. #fields)
  redis.call('SET', KEYS[2], version)
  return {version, fields}
end
if version == ARGV[2] then return 0 end
return {version, redis.call('HKEYS', KEYS[1])}
