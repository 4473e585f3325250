-- register: record keyspaces (table, digest, buckets) in the registry. A field new there gives
-- the registry a new version, which every commit's publish reads: a writer whose list of the
-- registry is older then reads it again (see siblings.py). Sent with every lease's fetch and
-- every commit's lock (pipelined behind them: a registry forgotten and made again between the
-- two then lists the keyspace, and the generation the fetch or lock made is older than it),
-- so a keyspace is in the registry before its reader reads the database or its writer
-- commits, whatever Redis forgot meanwhile.
-- A field's value is the server time (ms) until which an entry of its keyspace may exist: every
-- entry is filled or published under a lease or lock taken in one pipeline with a
-- registration, and lives its TTL at most, so a keyspace nobody registered for ARGV[3] ms
-- holds none, and no commit needs to reach it. Once a minute at most (or ARGV[3] if shorter) the script drops the
-- fields whose time has passed, and gives the registry a new version if it dropped any.
-- Only GET, SET, HGET, HSET, HGETALL, HDEL, HKEYS and TIME: the documented least-privilege ACL
-- (running-redis.md).
-- KEYS[1] the registry hash, KEYS[2] its version key, KEYS[3] its pruning key (same hash slot)
-- ARGV[1] the caller's process token, ARGV[2] the version the caller knows ('' none),
-- ARGV[3] how long (ms) from now an entry of these keyspaces may exist, ARGV[4..] the fields
-- returns the server time (microseconds) it ran at when the version is still ARGV[2], else
--   {the version, the registry's fields, that time}: the caller's new list of them, for free.
--   The time: on a Cluster the registration runs on another node than the fetch or lock it
--   goes with, and a generation made after it may have been made after a registry Redis
--   made again meanwhile (backend.py, Registration)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ran_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local need = tonumber(ARGV[3]) or 0
-- renewed a minute (or the lifetime itself, if shorter) ahead of need: one HSET a minute at
-- most per keyspace, whatever the traffic
local slack = math.min(60000, need)
local version = redis.call('GET', KEYS[2])
local new = not version
for i = 4, #ARGV do
  local held = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if not held then
    redis.call('HSET', KEYS[1], ARGV[i], now + need + slack)
    new = true
  elseif held < now + need then
    redis.call('HSET', KEYS[1], ARGV[i], now + need + slack)
  end
end
-- when this registry was made (microseconds): a registry Redis forgot comes back without it,
-- and registry_whole.lua replaces the generations made before it. Looked at only when a field
-- was missing (a new registry misses every one); a registry without it otherwise (made by a
-- version before this field) is given one when it is made whole, from that moment
if new and not redis.call('HGET', KEYS[1], '~|since|0') then
  redis.call('HSET', KEYS[1], '~|since|0', t[1] .. string.rep('0', 6 - #t[2]) .. t[2])
end
if redis.call('SET', KEYS[3], now, 'PX', math.max(1000, slack), 'NX') then
  local all = redis.call('HGETALL', KEYS[1])
  for j = 1, #all, 2 do
    local held = tonumber(all[j + 1])
    if not held or held < now then
      redis.call('HDEL', KEYS[1], all[j])
      new = true
    end
  end
end
if new then
  -- never a version seen before, even after a FLUSHALL: the server's time, the process's
  -- token, and the registry's size (which each new field grows: two in one microsecond differ)
  local fields = redis.call('HKEYS', KEYS[1])
  version = new_token(ARGV[1] .. '.' .. #fields)
  redis.call('SET', KEYS[2], version)
  return {version, fields, ran_us}
end
if version == ARGV[2] then return ran_us end
return {version, redis.call('HKEYS', KEYS[1]), ran_us}
