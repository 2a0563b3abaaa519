//! Lua scripts: the two writes that must be atomic on the Redis side.

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

/// Applies one consumer's share of a counter batch exactly once.
/// KEYS[1] = the consumer's batch ledger; then pairs (counter hash, day's entry index).
/// ARGV: instance id, batch sequence, retention seconds, then per pair: entry id, field count,
/// and that many (field, increment) pairs. A sequence at or below the ledger's is already applied
/// (batches of one instance are written strictly in order), so a retry after a timeout adds nothing.
pub static APPLY_BATCH: Lua = Lua {
    source: APPLY_BATCH_SOURCE,
    script: LazyLock::new(|| Script::new(APPLY_BATCH_SOURCE)),
};
const APPLY_BATCH_SOURCE: &str = r"
local seq = tonumber(ARGV[2])
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if seq <= last then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], seq)
redis.call('EXPIRE', KEYS[1], ARGV[3])
local a = 4
for k = 2, #KEYS, 2 do
  local entry = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[3])
  redis.call('SADD', KEYS[k + 1], entry)
  redis.call('EXPIRE', KEYS[k + 1], ARGV[3])
end
return 1
";
