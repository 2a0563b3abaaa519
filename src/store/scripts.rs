//! Lua scripts: the steps that must be atomic on the Redis side.
//!
//! Redis does not roll back a script's earlier writes when a later command fails, so the write
//! script checks every key it will touch (type, and that each field it adds to holds an integer)
//! before its first write, and answers a refusal as a reply instead of raising: a refused share is
//! known to have written nothing and can be retried later under a new sequence. Its ledger is
//! written last, so a share is only ever marked applied once all of it is.

use std::sync::LazyLock;

use redis::Script;

/// A script and its source, so it can be loaded again after Redis lost its script cache.
pub struct Lua {
    pub source: &'static str,
    pub script: LazyLock<Script>,
}

impl Lua {
    pub fn sha(&self) -> &str {
        self.script.get_hash()
    }
}

/// Writes a seed copy unless an operator owns the key (a record without a TTL is never overwritten).
/// KEYS[1] = key; ARGV[1] = value; ARGV[2] = TTL seconds. Returns 1 if written, 0 if left alone.
pub static SET_UNLESS_PERSISTENT: Lua = Lua {
    source: SET_UNLESS_PERSISTENT_SOURCE,
    script: LazyLock::new(|| Script::new(SET_UNLESS_PERSISTENT_SOURCE)),
};
const SET_UNLESS_PERSISTENT_SOURCE: &str = r"
if redis.call('PTTL', KEYS[1]) == -1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
";

/// Applies one admin write all at once (SPEC §10): every key's type is checked before the first
/// write, then the operations run, the audit entry is appended and the invalidation published.
///
/// KEYS: every key the write touches, the audit stream last. ARGV[1] = JSON
/// `{"types":[[i,"hash"],…],"ops":[["set",i,value],["del",i],["hset",i,field,value],["hdel",i,field],
/// ["zadd",i,member],["zrem",i,member]],"max":audit cap,"audit":[field,value,…],"publish":[[channel,message],…]}`
/// (key indexes are 1-based). Replies `"ok"`, or `["refused", key, reason]` with nothing written.
pub static ADMIN_WRITE: Lua = Lua {
    source: ADMIN_WRITE_SOURCE,
    script: LazyLock::new(|| Script::new(ADMIN_WRITE_SOURCE)),
};
const ADMIN_WRITE_SOURCE: &str = r"
local w = cjson.decode(ARGV[1])
for _, t in ipairs(w.types) do
  local found = redis.call('TYPE', KEYS[t[1]])['ok']
  if found ~= 'none' and found ~= t[2] then
    return {'refused', KEYS[t[1]], 'holds a ' .. found .. ', not a ' .. t[2]}
  end
end
local audit = KEYS[#KEYS]
local found = redis.call('TYPE', audit)['ok']
if found ~= 'none' and found ~= 'stream' then
  return {'refused', audit, 'holds a ' .. found .. ', not a stream'}
end
for _, op in ipairs(w.ops) do
  local key = KEYS[op[2]]
  if op[1] == 'set' then redis.call('SET', key, op[3])
  elseif op[1] == 'del' then redis.call('DEL', key)
  elseif op[1] == 'hset' then redis.call('HSET', key, op[3], op[4])
  elseif op[1] == 'hdel' then redis.call('HDEL', key, op[3])
  elseif op[1] == 'zadd' then redis.call('ZADD', key, 0, op[3])
  elseif op[1] == 'zrem' then redis.call('ZREM', key, op[3])
  end
end
redis.call('XADD', audit, 'MAXLEN', '~', w.max, '*', unpack(w.audit))
for _, p in ipairs(w.publish) do redis.call('PUBLISH', p[1], p[2]) end
return 'ok'
";

/// Applies one consumer's share of a counter batch exactly once.
///
/// KEYS[1] = this instance's ledger for the consumer (a string: the last sequence applied); then
/// pairs (counter hash, day's entry index). ARGV: sequence, retention seconds, ledger TTL seconds,
/// then per pair: entry id, field count, and that many (field, increment) pairs.
///
/// Replies 1 (applied), 0 (this sequence was applied before: a retry after a timeout adds nothing),
/// or `["refused", key, reason]` when a key has the wrong type or a field is not a count — then
/// nothing was written. A sequence at or below the ledger's is already applied: one instance sends
/// a consumer's shares strictly in order, one at a time.
///
/// Fields are capped at 18 digits, so no HINCRBY can overflow and fail after the checks.
pub static APPLY_BATCH: Lua = Lua {
    source: APPLY_BATCH_SOURCE,
    script: LazyLock::new(|| Script::new(APPLY_BATCH_SOURCE)),
};
const APPLY_BATCH_SOURCE: &str = r"
local function kind(key) return redis.call('TYPE', key)['ok'] end
local function count(v) return string.match(v, '^%d+$') ~= nil and #v <= 18 end
local ledger = kind(KEYS[1])
local last = 0
if ledger == 'string' then
  local v = redis.call('GET', KEYS[1])
  if not count(v) then return {'refused', KEYS[1], 'the ledger is not a sequence number'} end
  last = tonumber(v)
elseif ledger ~= 'none' then
  return {'refused', KEYS[1], 'the ledger is a ' .. ledger .. ', not a string'}
end
if tonumber(ARGV[1]) <= last then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 0
end
local a = 4
for k = 2, #KEYS, 2 do
  local t = kind(KEYS[k])
  if t ~= 'none' and t ~= 'hash' then return {'refused', KEYS[k], 'the counter is a ' .. t .. ', not a hash'} end
  t = kind(KEYS[k + 1])
  if t ~= 'none' and t ~= 'set' then return {'refused', KEYS[k + 1], 'the entry index is a ' .. t .. ', not a set'} end
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    local v = redis.call('HGET', KEYS[k], ARGV[a])
    if v and not count(v) then
      return {'refused', KEYS[k], 'field ' .. ARGV[a] .. ' is not a count'}
    end
    a = a + 2
  end
end
a = 4
for k = 2, #KEYS, 2 do
  local entry = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[2])
  redis.call('SADD', KEYS[k + 1], entry)
  redis.call('EXPIRE', KEYS[k + 1], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
";

/// Reads a consumer's day in one atomic step, so a count can never be seen half-updated by a
/// concurrent write: the day's entry index, the counters of the given entries and of every entry in
/// the index, and this instance's ledger.
///
/// KEYS[1] = entry index; KEYS[2] = ledger; KEYS[3..] = counters of the entries ARGV[3..].
/// ARGV[1], ARGV[2] = counter key prefix and suffix around an entry id (for entries found only in
/// the index; they share the consumer's hash tag). Replies `[ledger or nil, id, [T1..T12], id, …]`.
/// A key of the wrong type raises (nothing is written, so nothing can be half done).
pub static READ_USAGE: Lua = Lua {
    source: READ_USAGE_SOURCE,
    script: LazyLock::new(|| Script::new(READ_USAGE_SOURCE)),
};
const READ_USAGE_SOURCE: &str = r"
local ids, keys, seen = {}, {}, {}
for i = 3, #ARGV do
  ids[#ids + 1] = ARGV[i]
  keys[#keys + 1] = KEYS[i]
  seen[ARGV[i]] = true
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not seen[id] then
    seen[id] = true
    ids[#ids + 1] = id
    keys[#keys + 1] = ARGV[1] .. id .. ARGV[2]
  end
end
local out = {redis.call('GET', KEYS[2])}
for i, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HMGET', keys[i], 'T1', 'T2', 'T3', 'T4', 'T5', 'T6', 'T7', 'T8', 'T9', 'T10', 'T11', 'T12')
end
return out
";

/// Reserves request quota for one replica in one window (SPEC §8.1 leases), exactly once.
/// KEYS[1] = the window's quota hash (field `total`: reserved by all replicas; one field per
/// replica: what it holds, cumulatively). ARGV: instance, the holding the replica believes it has,
/// how much more it wants, the limit, TTL seconds. The request is applied only if the holding is
/// still the one the replica saw, so a retry after a timeout (the first try may have been applied)
/// reserves nothing twice: it just learns the holding. Returns {holding, total}, or {-1, type} when
/// the key is not a hash (written by someone else: nothing is touched).
pub static QUOTA_LEASE: Lua = Lua {
    source: QUOTA_LEASE_SOURCE,
    script: LazyLock::new(|| Script::new(QUOTA_LEASE_SOURCE)),
};
const QUOTA_LEASE_SOURCE: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then return {-1, kind} end
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
if held ~= tonumber(ARGV[2]) then return {held, total} end
local give = math.min(tonumber(ARGV[3]), tonumber(ARGV[4]) - total)
if give > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], give)
  redis.call('HINCRBY', KEYS[1], 'total', give)
  held = held + give
  total = total + give
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {held, total}
";

/// Sets one replica's holding in a window to what it used: returns an unused lease (idle replica)
/// or records calls it allowed beyond its lease while Redis was down. Absolute, so a retry is
/// harmless. KEYS[1] = the quota hash; ARGV: instance, used, TTL seconds. Returns {used, total},
/// or {-1, type} when the key is not a hash.
pub static QUOTA_SYNC: Lua = Lua {
    source: QUOTA_SYNC_SOURCE,
    script: LazyLock::new(|| Script::new(QUOTA_SYNC_SOURCE)),
};
const QUOTA_SYNC_SOURCE: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then return {-1, kind} end
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local used = tonumber(ARGV[2])
if held ~= used then
  redis.call('HINCRBY', KEYS[1], 'total', used - held)
  redis.call('HSET', KEYS[1], ARGV[1], used)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return {used, tonumber(redis.call('HGET', KEYS[1], 'total') or '0')}
";

/// Records one consumer's usage batch exactly once (SPEC §9).
///
/// KEYS[1] = the seen-id set; KEYS[2] = the batch's ledger; KEYS[3..] = the sums the records add
/// to, their kinds in ARGV[8] (`d` day hash, `m` month hash, `s` the day's entry index). ARGV: now
/// (ms), forget-before (ms), seen-set TTL, day TTL, month TTL, ledger TTL (seconds), record count,
/// kinds; then per record: id digest, seen-at (ms), day / month / index key positions, entry id,
/// slot (`T3`), input, output, cost in 10⁻¹², whole cost units. A record whose digest the set
/// holds (or that came earlier in the batch) is a duplicate and adds nothing. Replies a string of
/// `1` (applied) and `0` (duplicate) per record, which the ledger keeps: a retry of the same batch
/// gets it back and writes nothing. A key of the wrong type is refused before any write.
pub static APPLY_USAGE: Lua = Lua {
    source: APPLY_USAGE_SOURCE,
    script: LazyLock::new(|| Script::new(APPLY_USAGE_SOURCE)),
};
const APPLY_USAGE_SOURCE: &str = r"
local done = redis.call('GET', KEYS[2])
if done then return done end
local kinds = ARGV[8]
local function kind_of(k)
  local c = string.sub(kinds, k - 2, k - 2)
  if c == 's' then return 'set' end
  return 'hash'
end
local function refuse(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then return {'refused', key, 'not a ' .. want} end
end
local bad = refuse(KEYS[1], 'zset')
if bad then return bad end
for k = 3, #KEYS do
  bad = refuse(KEYS[k], kind_of(k))
  if bad then return bad end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
local n = tonumber(ARGV[7])
local flags, sums, order, wholes, batch = {}, {}, {}, {}, {}
local function add(k, f, v)
  if v == 0 then return end
  local t = sums[k]
  if not t then
    t = {}
    sums[k] = t
    order[#order + 1] = k
  end
  t[f] = (t[f] or 0) + v
end
for i = 0, n - 1 do
  local a = 9 + i * 11
  local id = ARGV[a]
  if batch[id] or redis.call('ZSCORE', KEYS[1], id) then
    flags[i + 1] = '0'
  else
    batch[id] = true
    flags[i + 1] = '1'
    redis.call('ZADD', KEYS[1], ARGV[a + 1], id)
    local day, month, index = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local slot = ARGV[a + 6]
    local input, output, pico = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
    for _, p in ipairs({slot .. ':', 'd:'}) do
      add(day, p .. 'i', input)
      add(day, p .. 'o', output)
      add(day, p .. 'c', pico)
    end
    add(month, 'i', input)
    add(month, 'o', output)
    add(month, 'c', pico)
    local whole = ARGV[a + 10]
    if whole ~= '0' then
      wholes[#wholes + 1] = {day, slot .. ':C', whole}
      wholes[#wholes + 1] = {day, 'd:C', whole}
      wholes[#wholes + 1] = {month, 'C', whole}
    end
    redis.call('SADD', KEYS[index], ARGV[a + 5])
  end
end
for _, k in ipairs(order) do
  for f, v in pairs(sums[k]) do
    local now = redis.call('HINCRBY', KEYS[k], f, string.format('%.0f', v))
    if string.sub(f, -1) == 'c' and now >= 1000000000000 then
      local carry = math.floor(now / 1000000000000)
      redis.call('HINCRBY', KEYS[k], f, string.format('%.0f', -carry * 1000000000000))
      redis.call('HINCRBY', KEYS[k], string.sub(f, 1, -2) .. 'C', string.format('%.0f', carry))
    end
  end
end
for _, w in ipairs(wholes) do
  redis.call('HINCRBY', KEYS[w[1]], w[2], w[3])
end
for k = 3, #KEYS do
  local ttl = ARGV[4]
  if string.sub(kinds, k - 2, k - 2) == 'm' then ttl = ARGV[5] end
  redis.call('EXPIRE', KEYS[k], ttl)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local out = table.concat(flags)
redis.call('SET', KEYS[2], out, 'EX', ARGV[6])
return out
";

/// Reads a consumer's usage sums for one date in one atomic step: the given entries and every
/// other entry in the day's index, each with its day hash and its month hash.
///
/// KEYS[1] = the day's entry index. ARGV[1..4] = day-hash prefix and suffix, month-hash prefix and
/// suffix around an entry id (all under the consumer's hash tag); ARGV[5..] = entry ids. Replies
/// `[id, HGETALL day, HGETALL month, …]`.
pub static READ_USAGE_SUMS: Lua = Lua {
    source: READ_USAGE_SUMS_SOURCE,
    script: LazyLock::new(|| Script::new(READ_USAGE_SUMS_SOURCE)),
};
const READ_USAGE_SUMS_SOURCE: &str = r"
local ids, seen = {}, {}
for i = 5, #ARGV do
  if not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    ids[#ids + 1] = ARGV[i]
  end
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not seen[id] then
    seen[id] = true
    ids[#ids + 1] = id
  end
end
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id .. ARGV[2])
  out[#out + 1] = redis.call('HGETALL', ARGV[3] .. id .. ARGV[4])
end
return out
";
