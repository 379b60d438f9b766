"""Lua sources of the Redis backend (loaded once per client, run with EVALSHA).

Every script touches the keys of one name only (``<prefix>{<name>}:…``, one hash tag), or keys
that share one fixed hash tag (claims, run history), so each script runs on a single Cluster
slot (see ``_redis_keys``). The one exception is the acquire script's read of the pre-0.2 fence
key, done with ``redis.pcall`` so that a refusal (ACL, Cluster) only skips that floor.

Needs Redis >= 6.0 (effects replication of scripts that call TIME, decimal BLPOP timeouts).

Numbers: Redis Lua numbers are doubles, exact up to 2**53. Fences are server time in
microseconds (about 1.8e15 today, below 2**53 = 9.0e15 until the year 2255), and are turned
into strings with ``%.0f`` so they never come out in exponent notation.
"""

from __future__ import annotations

#: KEYS: lock, fence, waiters flag. ARGV: owner, ttl_ms, client_floor, flag lifetime in ms,
#: legacy fence key (or '').
#: Returns the new fence (a string) when ``owner`` now holds the lock – including when it
#: already did (a retried call) – else the holder's PTTL in ms (an integer). A failed attempt
#: raises the waiters flag, in the same atomic step, so the next release knows to wake someone.
#: fence = max(stored + 1, server TIME in µs, client floor + 1); when there is no stored fence
#: (a new name, a restart without persistence, the first acquisition after the key layout
#: changed), the fence of the old layout's key is the stored fence, so fences never go back
#: across the layout change even when that fence ran ahead of the server's clock. When the
#: server refuses that read (an ACL user confined to the new prefix, a Cluster), the fence
#: comes back with a ``!`` appended, and the client stops asking.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local stored = redis.call('GET', KEYS[2])
  local refused = ''
  if not stored and ARGV[5] ~= '' then
    stored = redis.pcall('GET', ARGV[5])
    if type(stored) == 'table' then refused = '!' end
    if type(stored) ~= 'string' then stored = nil end
  end
  local last = tonumber(stored or '0') or 0
  if last >= fence then fence = last + 1 end
  local floor = tonumber(ARGV[3]) or 0
  if floor >= fence then fence = floor + 1 end
  local text = string.format('%.0f', fence)
  redis.call('SET', KEYS[2], text)
  return text .. refused
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local held = redis.call('GET', KEYS[2])
  if held then return held end
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
return redis.call('PTTL', KEYS[1])
"""

#: KEYS: lock, wait list, waiters flag, tombstone. ARGV: owner, wake-token lifetime in ms,
#: tombstone lifetime in ms.
#: Compare-and-delete. Returns 1 when it deleted ``owner``'s lock, 2 when the tombstone says
#: ``owner`` already released it (a retried call whose first reply was lost), else 0.
#: When someone failed to take the lock lately (the waiters flag is up), also leaves exactly
#: one token in the wait list, which wakes one waiter blocked in BLPOP (or is found by the next
#: one to block, until it expires). Uncontended locks skip that work. The tombstone is a key of
#: this owner alone, so later acquisitions and releases by others cannot erase it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('DEL', KEYS[2])
    redis.call('LPUSH', KEYS[2], '1')
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
  return 1
end
if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end
return 0
"""

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
