-- epoch_bump: start a new epoch. Every bucket generation of every registered keyspace is
-- replaced (a bucket under a generation lock is marked contended: its last owner replaces it),
-- so no entry written before the epoch is served again, then the epoch key names this server.
-- An absent generation key stays absent: no entry matches it (its next use creates a new token).
-- Whichever process sees the change first does it; the others find the epoch valid.
-- KEYS[1] epoch key, KEYS[2..] generation keys
-- ARGV[1] the epoch key's value epoch_check saw ('' = absent), ARGV[2] a random nonce,
-- ARGV[3] '1' to replace them even though the epoch names this server (a process that was
--   using another server until now: its last writes may be missing here)
-- ARGV[4] near channel
-- returns {1, epoch, replaced} done | {1, epoch, -1} another process did it first
--   | {3} the epoch moved otherwise meanwhile: check again | {0, role} not a primary
local role = string.match(redis.call('INFO', 'replication'), 'role:(%a+)')
if role ~= 'master' then return {0, role or '?'} end
local identity = server_identity()
local e = redis.call('GET', KEYS[1]) or ''
if string.sub(e, 1, #identity + 1) == identity .. '|' and ARGV[3] ~= '1' then return {1, e, -1} end
if e ~= ARGV[1] then return {3} end
local replaced = 0
for i = 2, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if g and gen_locked(g) then
    local lock = cmsgpack.unpack(string.sub(g, 2))
    if lock[3] == 0 then
      lock[3] = 1
      redis.call('SET', KEYS[i], 'L' .. cmsgpack.pack(lock), 'KEEPTTL')
    end
    replaced = replaced + 1
  elseif g then
    redis.call('SET', KEYS[i], new_token(ARGV[2]))
    replaced = replaced + 1
  end
end
local epoch = identity .. '|' .. new_token(ARGV[2])
redis.call('SET', KEYS[1], epoch)
notify('*')
return {1, epoch, replaced}
