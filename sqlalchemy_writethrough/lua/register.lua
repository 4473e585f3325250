-- register: record a keyspace (table, digest, buckets) in the registry. A field new there gives
-- the registry a new version (a random nonce), which every commit's publish reads: a writer
-- whose list of the registry is older then reads it again (see siblings.py).
-- KEYS[1] the registry hash, KEYS[2] its version key (same hash slot)
-- ARGV[1] the field, ARGV[2] a new nonce
-- returns {the version, the registry's fields}: the writer's list of them, for free
if redis.call('HSET', KEYS[1], ARGV[1], 1) == 1 or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[2])
end
return {redis.call('GET', KEYS[2]), redis.call('HKEYS', KEYS[1])}
