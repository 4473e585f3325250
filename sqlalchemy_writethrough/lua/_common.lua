-- Shared helpers, prepended to every script by protocol.py (Redis has no `require`).
-- Entry states (first byte of the value):
--   'V' .. gen .. ':' .. payload   VALUE: a committed row, valid while gen equals the bucket generation
--   'L' .. msgpack{owners, contended, prev, prev_expire_ms, gen}   LOCK taken by writers before COMMIT
--   'E' .. token .. ':' .. gen     LEASE: only the holder of token may fill
-- The generation key of a bucket holds an opaque token; it is created on first use and replaced
-- (never incremented) by a whole-model invalidation, so a lost generation key cannot revive old entries.
-- While a transaction changes rows it cannot name (range DML, raw SQL, database cascades), the
-- generation key holds a GENERATION LOCK instead: 'L' .. msgpack{owners, prev token, contended},
-- with a TTL. Every entry of the bucket is then a miss and no fill is accepted; the lock's
-- release after COMMIT writes a new token, and its expiry (a crashed writer) removes the key,
-- so the next use creates a new token: either way the bucket's old entries are never served again.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function generation(gkey)
  local g = redis.call('GET', gkey)
  if not g then
    local t = redis.call('TIME')
    g = 't' .. t[1] .. '.' .. t[2]
    redis.call('SET', gkey, g)
  end
  return g
end

-- generation() once per generation key within one script call (a commit's keys share few)
local gens_seen = {}
local function generation_once(gkey)
  local g = gens_seen[gkey]
  if not g then
    g = generation(gkey)
    gens_seen[gkey] = g
  end
  return g
end

-- the generation key's value (nil when absent), read once per script call
local function current_gen(gkey)
  local g = gens_seen[gkey]
  if g == nil then
    g = redis.call('GET', gkey) or false
    gens_seen[gkey] = g
  end
  if g == false then return nil end
  return g
end

local function gen_locked(g)
  return string.byte(g, 1) == 76
end

local function new_token(nonce)
  local t = redis.call('TIME')
  return 'n' .. t[1] .. '.' .. t[2] .. '.' .. nonce
end

-- the server time (microseconds) a generation token was made at, and the same for now
local function token_us(g)
  local s, u = string.match(g, '^[tn](%d+)%.(%d+)')
  if not s then return nil end
  return tonumber(s) * 1000000 + tonumber(u)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- whether a generation token was made before the time ``us`` (a token of no known form: yes)
local function made_before(g, us)
  local made = token_us(g)
  return made == nil or made < us
end

local function value_gen(v)
  local sep = string.find(v, ':', 2, true)
  if not sep then return nil end
  return string.sub(v, 2, sep - 1)
end

-- A LOCK's fields, or nil when the entry is damaged (never let a bad entry fail a script).
local function read_lock(v)
  local ok, lock = pcall(cmsgpack.unpack, string.sub(v, 2))
  if not ok or type(lock) ~= 'table' or type(lock[1]) ~= 'table' or type(lock[2]) ~= 'number'
      or type(lock[5]) ~= 'string' then
    return nil
  end
  return lock
end

-- A LEASE or LOCK always carries a TTL and a LOCK must decode; anything else is damage.
local function damaged(key, v)
  local tag = string.byte(v, 1)
  if tag == 86 then return value_gen(v) == nil end
  if tag == 69 or tag == 76 then
    if redis.call('PTTL', key) < 0 then return true end
    return tag == 76 and read_lock(v) == nil
  end
  return true
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- '<run id>:<replication id>' of this server: both change when its data set may not be the
-- one it acknowledged writes to (a restart, a restore, a failover, a REPLICAOF)
local function server_identity()
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or '?'
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or '?'
  return run_id .. ':' .. replid
end

-- The near cache (in-process copies of entries in each application process): a script that
-- changes entries or generations tells them on a channel, one message per call. The caller
-- appends the channel name as the last ARGV of such a script; '' (no process of this cache
-- uses a near cache) publishes nothing. A message is 'k' then the changed entity keys, 'g' then
-- the changed generation keys (every entry of those buckets), each a msgpack array of names (a
-- key may hold any character), or '*' (everything). A PUBLISH refused (an ACL user without the
-- channel) fails nothing: the other processes' copies then expire within the staleness bound.
local function notify(kind, first, step)
  local channel = ARGV[#ARGV]
  if channel == '' then return end
  if kind == '*' then
    redis.pcall('PUBLISH', channel, '*')
    return
  end
  local names = {}
  for i = first, #KEYS, step do names[#names + 1] = KEYS[i] end
  if #names == 0 then return end
  redis.pcall('PUBLISH', channel, kind .. cmsgpack.pack(names))
end
