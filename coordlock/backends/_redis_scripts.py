"""Lua sources of the Redis backend (loaded once per client, run with EVALSHA).

Every script touches the keys of one name only (``<prefix>{<name>}:…``, one hash tag), or keys
that share one fixed hash tag (claims, run history), so each script runs on a single Cluster
slot (see ``_redis_keys``). Lock scripts are given the lock key alone and derive the name's
other keys from it (same hash tag). The one exception is the acquire script's read of the
pre-0.2 fence key, done with ``redis.pcall`` so that a refusal (ACL, Cluster) only skips it.

Needs Redis >= 6.0 (effects replication of scripts that call TIME, decimal BLPOP timeouts).

Numbers: Redis Lua numbers are doubles, exact up to 2**53. Fences are server time in
microseconds (about 1.8e15 today, below 2**53 = 9.0e15 until the year 2255), and are turned
into strings with ``%.0f`` so they never come out in exponent notation.
"""

from __future__ import annotations

# Lock scripts take one key, the lock key ``<prefix>{<name>}:lock``; the other keys of the name
# share its head (``tag``) and are derived inside the script, which keeps each call to a few
# arguments (argument packing is most of redis-py's per-call cost without hiredis):
#   tag:fence              latest fence
#   tag:queue              ZSET of waiting owners, scored by arrival (server µs): FIFO order
#   tag:waiting            HASH owner -> "<registration expiry ms>|<ttl ms>|<registered at µs>"
#   tag:wake:<owner>       LIST: the hand-over "<fence>|<µs from registration to hand-over>"
#   tag:released:<owner>   tombstone: "<owner> released this lock" (short-lived)

#: Lua snippet shared by the lock scripts (pasted in, not a Lua function: defining functions
#: costs time on every call). Given ``tag``, ``t`` (a TIME reply), ``floor`` and ``legacy``, it
#: sets ``text`` to the next fence, max(stored + 1, server time in µs, floor + 1), and stores
#: it. When nothing is stored and ``legacy`` is not nil, the old layout's fence key ``legacy``
#: counts as the stored fence; ``refused`` becomes '!' when the server refused that read.
_NEXT_FENCE = """
  local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local stored = redis.call('GET', tag .. ':fence')
  local refused = ''
  if not stored and legacy then
    stored = redis.pcall('GET', legacy)
    if type(stored) == 'table' then refused = '!' end
    if type(stored) ~= 'string' then stored = nil end
  end
  local last = tonumber(stored or '0') or 0
  if last >= fence then fence = last + 1 end
  if floor >= fence then fence = floor + 1 end
  local text = string.format('%.0f', fence)
  redis.call('SET', tag .. ':fence', text)
"""

#: Lua snippet ending release, abandon and force-release: give the lock (held, at ``lock``)
#: to the longest-waiting live waiter — one round trip less than waking it to try again — or
#: delete it when nobody waits; then ``return 1``. Registrations past their expiry (a waiter
#: that died or gave up without saying so) are dropped on the way, 16 at most per call.
_HAND_OVER = (
    """
local queue, waiting = tag .. ':queue', tag .. ':waiting'
for _ = 1, 16 do
  local head = redis.call('ZRANGE', queue, 0, 0)
  local waiter = head[1]
  if not waiter then break end
  redis.call('ZREM', queue, waiter)
  local info = redis.call('HGET', waiting, waiter)
  redis.call('HDEL', waiting, waiter)
  if info then
    local t = redis.call('TIME')
    local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local expiry_ms, ttl_ms, since_us = string.match(info, '^(%d+)|(%d+)|(%d+)$')
    if expiry_ms and tonumber(expiry_ms) * 1000 > now_us then
      redis.call('SET', lock, waiter, 'PX', ttl_ms)
      local floor, legacy = 0, nil
"""
    + _NEXT_FENCE
    + """
      local wake = tag .. ':wake:' .. waiter
      redis.call('RPUSH', wake, text .. '|' .. string.format('%.0f', now_us - since_us))
      redis.call('PEXPIRE', wake, ttl_ms)
      return 1
    end
  end
end
redis.call('DEL', lock)
return 1
"""
)

#: KEYS: lock. ARGV: owner, ttl_ms, client floor, register_ms (0: do not queue).
#: Returns the new fence (a string) when ``owner`` now holds the lock; the fence with ``=``
#: appended when ``owner`` already held it (a retried call, or a hand-over that happened before
#: this call); else the holder's PTTL in ms (an integer). With register_ms > 0 a failed attempt
#: queues ``owner`` for a hand-over for register_ms (refreshed by each attempt; the first
#: arrival keeps its place). When there is no stored fence (a new name, a restart without
#: persistence, the first acquisition after the key layout changed), the fence of the old
#: layout's key ``{<prefix><name>}:fence`` counts as the stored one (``LEGACY``), so fences
#: never go back across the layout change even when that fence ran ahead of the server's
#: clock. When the server refuses that read (an ACL user confined to the new prefix, a
#: Cluster), the fence comes back with ``!`` appended, and the client stops asking.
ACQUIRE_TEMPLATE = (
    """
local lock, owner = KEYS[1], ARGV[1]
local tag = string.sub(lock, 1, -6)
if redis.call('SET', lock, owner, 'NX', 'PX', ARGV[2]) then
  if ARGV[4] ~= '0' then
    redis.call('ZREM', tag .. ':queue', owner)
    redis.call('HDEL', tag .. ':waiting', owner)
  end
  local legacy = nil
  if LEGACY then
    local open = string.find(tag, '{', 1, true)
    local name = string.sub(tag, open + 1, -2)
    if string.byte(name, 1) == 92 then name = string.sub(name, 2) end  -- escaped: drop it
    legacy = '{' .. string.sub(tag, 1, open - 1) .. name .. '}:fence'
  end
  local t = redis.call('TIME')
  local floor = tonumber(ARGV[3]) or 0
"""
    + _NEXT_FENCE
    + """
  return text .. refused
end
if redis.call('GET', lock) == owner then
  local held = redis.call('GET', tag .. ':fence')
  if held then return held .. '=' end
end
local register = tonumber(ARGV[4])
if register > 0 then
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local queue, waiting = tag .. ':queue', tag .. ':waiting'
  redis.call('ZADD', queue, 'NX', now_us, owner)
  local expiry = string.format('%.0f', math.floor(now_us / 1000) + register)
  local since = string.format('%.0f', now_us)
  redis.call('HSET', waiting, owner, expiry .. '|' .. ARGV[2] .. '|' .. since)
  redis.call('PEXPIRE', queue, register)
  redis.call('PEXPIRE', waiting, register)
end
return redis.call('PTTL', lock)
"""
)
ACQUIRE = ACQUIRE_TEMPLATE.replace("if LEGACY then", "if true then")
ACQUIRE_NO_LEGACY = ACQUIRE_TEMPLATE.replace("if LEGACY then", "if false then")

#: KEYS: lock. ARGV: owner, tombstone lifetime in ms.
#: Compare-and-delete, or compare-and-hand-over when someone waits (see ``_HAND_OVER``).
#: Returns 1 when it released ``owner``'s lock, 2 when the tombstone says ``owner`` already
#: released it (a retried call whose first reply was lost), else 0. The tombstone is a key of
#: this owner alone, so later acquisitions and releases by others cannot erase it.
RELEASE = (
    """
local lock, owner = KEYS[1], ARGV[1]
local tag = string.sub(lock, 1, -6)
local tombstone = tag .. ':released:' .. owner
if redis.call('GET', lock) ~= owner then
  if redis.call('EXISTS', tombstone) == 1 then return 2 end
  return 0
end
redis.call('SET', tombstone, '1', 'PX', ARGV[2])
if redis.call('EXISTS', tag .. ':queue') == 0 then
  redis.call('DEL', lock)
  return 1
end
"""
    + _HAND_OVER
)

#: KEYS: lock. ARGV: owner. A waiter gives up: it leaves the queue; if a hand-over made it the
#: holder meanwhile, the lock goes on to the next waiter (or is freed): returns 1, else 0.
ABANDON = (
    """
local lock, owner = KEYS[1], ARGV[1]
local tag = string.sub(lock, 1, -6)
redis.call('ZREM', tag .. ':queue', owner)
redis.call('HDEL', tag .. ':waiting', owner)
redis.call('DEL', tag .. ':wake:' .. owner)
if redis.call('GET', lock) ~= owner then return 0 end
"""
    + _HAND_OVER
)

#: KEYS: lock. An operator's forced release: whoever holds it, the lock goes to the next waiter
#: (or is freed); the fence key is kept, so the next fence is still greater. Returns 1 if the
#: lock was held, else 0.
FORCE_RELEASE = (
    """
local lock = KEYS[1]
local tag = string.sub(lock, 1, -6)
if redis.call('EXISTS', lock) == 0 then return 0 end
"""
    + _HAND_OVER
)

#: KEYS: lock. ARGV: owner, ttl_ms. Compare-and-PEXPIRE (an expired key reads as nil).
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS: claim keys. ARGV: hold_ms, token. Returns the 1-based indexes of the keys won.
#: A retried call with the same token wins the keys its first attempt took (idempotent).
CLAIM_MANY = """
local won = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[2], 'NX', 'PX', ARGV[1]) then
    won[#won + 1] = i
  elseif redis.call('GET', key) == ARGV[2] then
    won[#won + 1] = i
  end
end
return won
"""

#: Raw compare-and-delete used by the benchmark baseline. KEYS: lock. ARGV: owner.
RAW_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: KEYS: run hash, job index (zset), all-runs index (zset).
#: ARGV: run_id, started (score), limit per job, run-hash key prefix, field, value, ...
RECORD_RUN = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local limit = tonumber(ARGV[3])
local n = redis.call('ZCARD', KEYS[2])
if n > limit then
  local drop = redis.call('ZRANGE', KEYS[2], 0, n - limit - 1)
  for _, id in ipairs(drop) do
    redis.call('DEL', ARGV[4] .. id)
    redis.call('ZREM', KEYS[3], id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - limit - 1)
end
return n
"""

#: KEYS: an index (zset). ARGV: limit, run-hash key prefix. Newest first; HGETALL replies.
HISTORY = """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local h = redis.call('HGETALL', ARGV[2] .. id)
  if #h > 0 then out[#out + 1] = h end
end
return out
"""
