-- epoch_check: is the data set this Redis holds the one the cache last validated?
-- The server's identity is its run id (new at every start: a restart, a restore, another server
-- behind the address) and its replication id (new at a failover or a REPLICAOF). The epoch key
-- holds the identity that was validated last and a token: '<run id>:<replid>|<token>'.
-- KEYS[1] epoch key
-- returns {1, epoch} valid | {2, identity, epoch or ''} a new epoch: invalidate, then epoch_bump
--   | {0, role} not a primary: the cache cannot use it
local role = string.match(redis.call('INFO', 'replication'), 'role:(%a+)')
if role ~= 'master' then return {0, role or '?'} end
local identity = server_identity()
local e = redis.call('GET', KEYS[1])
if e and string.sub(e, 1, #identity + 1) == identity .. '|' then return {1, e} end
return {2, identity, e or ''}
