-- fill: write a row read from the database, only over the caller's own lease.
-- KEYS[1] entity key, KEYS[2] generation key
-- ARGV[1] lease token, ARGV[2] generation seen with the lease, ARGV[3] payload ('' = give the
-- lease up without filling, so other readers may fill), ARGV[4] ttl ms
-- returns 1 written | 0 refused (a writer's lock or an invalidation replaced the lease)
local v = redis.call('GET', KEYS[1])
if v ~= 'E' .. ARGV[1] .. ':' .. ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  return 0
end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], 'V' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
