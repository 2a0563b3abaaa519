//! The Redis adapter: a deadpool-redis pool behind short timeouts and a health latch.
//!
//! Redis is never allowed to slow the service down. Every operation is bounded by the command
//! timeout; the first failure marks Redis down, after which callers skip it without any I/O until the
//! health loop (a PING every `health_interval_ms`) sees it answer again. Callers fall back to the
//! in-process cache and the seed, and keep counters in memory meanwhile.
//!
//! Pipelines are sent with per-command results (`ignore_errors`): one key of the wrong type is that
//! key's problem, reported with its name, never a failure of everything else in the round trip.

mod admin;
pub mod export;
pub mod keys;
pub mod scripts;
mod usage;

pub use admin::{AdminOp, AdminWrite, AuditRow, INVALIDATION_CHANNEL, KeyKind};

pub use usage::{BatchOutcome, StoredDay, StoredRecord, StoredSpent, UsageBatch, UsageTtls};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool::managed::{Metrics as PoolMetrics, Object, RecycleResult};
use deadpool_redis::Runtime;
use jiff::civil::Date;
use metrics::{Counter, Gauge, counter, gauge};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};

use crate::config::RedisSettings;
use crate::core::model::SLOTS;
use scripts::Lua;

/// Longest wait for a bulk write (a batch of usage records), whatever the command timeout.
const BULK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an operation may take, and what its running late means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// The command timeout; running late marks Redis down (nothing on `/auth` may wait on it).
    Hot,
    /// [`BULK_TIMEOUT`]; running late is the operation's failure only.
    Bulk,
}

/// A connection handed out this recently is known to work (one that failed was discarded).
const RECENTLY_USED: Duration = Duration::from_secs(1);

/// deadpool-redis's manager without its UNWATCH + PING round trip on every `get()`: only
/// connections idle for longer than [`RECENTLY_USED`] are checked. Without this every Redis
/// operation cost two round trips.
struct CheckedManager(deadpool_redis::Manager);

impl deadpool::managed::Manager for CheckedManager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.0.create().await
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        metrics: &PoolMetrics,
    ) -> RecycleResult<RedisError> {
        if metrics.last_used() < RECENTLY_USED {
            return Ok(());
        }
        self.0.recycle(conn, metrics).await
    }
}

type Pool = deadpool::managed::Pool<CheckedManager>;

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached in time: it is marked down.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error (wrong type, script error): data trouble, not an outage.
    #[error("redis rejected the command: {0}")]
    Rejected(String),
    /// Redis does not know a script (it restarted or was flushed): load it and retry.
    #[error("redis lost its scripts")]
    NoScript,
}

/// Why the store could not be built (a malformed URL; the config check normally catches it).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("not a Redis URL: {0}")]
    Url(#[source] RedisError),
    #[error("cannot build the connection pool: {0}")]
    Pool(#[from] deadpool::managed::BuildError),
}

/// A replica's holding of a window's quota and the total all replicas hold, as Redis has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaReply {
    pub held: u64,
    pub total: u64,
}

/// A string value and whether it has no TTL (an operator's record, never overwritten by seed copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub value: String,
    pub persistent: bool,
}

/// One counter hash's increments within a batch.
#[derive(Debug, Clone)]
pub struct CounterDelta {
    pub entry: Arc<str>,
    pub date: Date,
    pub slots: [u64; SLOTS],
}

/// One consumer's share of a batch (one script call, one Cluster slot), with the sequence number it
/// is sent under: a retry sends the same share under the same number.
#[derive(Debug, Clone)]
pub struct ConsumerBatch {
    pub username: Arc<str>,
    pub seq: u64,
    pub counters: Vec<CounterDelta>,
}

/// What Redis did with one consumer's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareOutcome {
    /// Applied now, or by an earlier try of the same sequence: confirmed either way.
    Applied,
    /// A key has the wrong type or a field is not a count (`key` names it): nothing was written.
    Refused { key: String, reason: String },
    /// Redis answered this share with an error of its own (out of memory, a read-only replica…):
    /// whether any of it was written is not known, so it is retried as it is.
    Failed(String),
}

/// Counters of one consumer and day as Redis holds them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredUsage {
    pub entries: Vec<(String, [u64; SLOTS])>,
    /// The last batch sequence of this instance applied for the consumer.
    pub applied_seq: u64,
}

pub struct RedisStore {
    pool: Pool,
    timeout: Duration,
    up: AtomicBool,
    /// Whether the first health check has finished (either way).
    checked: AtomicBool,
    up_gauge: Gauge,
    errors: Counter,
    url_for_logs: String,
    /// For the pub/sub subscription, which needs a connection of its own.
    client: redis::Client,
    /// Whether the invalidation subscription is in place (for `/readyz`).
    subscribed: AtomicBool,
}

impl RedisStore {
    /// Builds the pool; nothing connects until first use. Fails only on a malformed URL.
    pub fn new(settings: &RedisSettings) -> Result<RedisStore, BuildError> {
        let connect = Duration::from_millis(settings.connect_timeout_ms);
        let timeout = Duration::from_millis(settings.command_timeout_ms);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect))
            // Bulk writes may wait longer than the command timeout; every other operation is
            // bounded by it in `run_within`.
            .set_response_timeout(Some(timeout.max(BULK_TIMEOUT)));
        let manager = deadpool_redis::Manager::new_with_config(settings.url.as_str(), config)
            .map_err(BuildError::Url)?;
        let pool = Pool::builder(CheckedManager(manager))
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(connect))
            .recycle_timeout(Some(timeout))
            .build()?;
        let store = RedisStore {
            pool,
            timeout,
            up: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            up_gauge: gauge!("uma_redis_up"),
            errors: counter!("uma_redis_errors_total"),
            url_for_logs: redact(&settings.url),
            client: redis::Client::open(settings.url.as_str()).map_err(BuildError::Url)?,
            subscribed: AtomicBool::new(false),
        };
        store.up_gauge.set(0.0);
        Ok(store)
    }

    /// Whether Redis answered lately; when false, callers must not wait on it.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether the first health check has finished, so [`RedisStore::is_up`] means something.
    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.up_gauge.set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!(redis = %self.url_for_logs, "redis connected");
            } else {
                tracing::warn!(redis = %self.url_for_logs, "redis unavailable; serving from cache and seed, counting in memory");
            }
        }
    }

    /// Runs `op` on a pooled connection within the command timeout; an outage marks Redis down.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_within(Patience::Hot, op).await
    }

    /// [`RedisStore::run`] with the given patience: a bulk write (a batch of usage records) may
    /// take longer than the command timeout under load, and its running late says nothing about
    /// whether Redis is up, so it neither waits only that long nor opens the breaker for `/auth`.
    async fn run_within<T, F, Fut>(&self, patience: Patience, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let limit = match patience {
            Patience::Hot => self.timeout,
            Patience::Bulk => self.timeout.max(BULK_TIMEOUT),
        };
        // Whether a failure was Redis (or the pool) being slow rather than unreachable.
        let late = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            let wait = deadpool::managed::Timeouts {
                wait: Some(limit),
                ..self.pool.timeouts()
            };
            let pooled = self.pool.timeout_get(&wait).await.map_err(|e| {
                if matches!(e, deadpool::managed::PoolError::Timeout(_)) {
                    late.store(true, Ordering::Relaxed);
                }
                StoreError::Unavailable(e.to_string())
            })?;
            let result = op(MultiplexedConnection::clone(&pooled))
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        late.store(true, Ordering::Relaxed);
                    }
                    classify(e)
                });
            if matches!(result, Err(StoreError::Unavailable(_))) {
                // Never hand a connection that just failed to the next caller unchecked.
                drop(Object::take(pooled));
            }
            result
        };
        let result = match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => {
                late.store(true, Ordering::Relaxed);
                Err(StoreError::Unavailable(format!(
                    "no answer within {limit:?}"
                )))
            }
        };
        if let Err(error) = &result {
            if *error == StoreError::NoScript {
                return result;
            }
            self.errors.increment(1);
            let late_bulk = patience == Patience::Bulk && late.load(Ordering::Relaxed);
            if matches!(error, StoreError::Unavailable(_)) && !late_bulk {
                self.set_up(false);
            }
        }
        result
    }

    /// PING; updates the health latch either way. A Redis that cannot be reached at the very first
    /// check is said once (SPEC §2): later losses are said by the latch as it flips.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let result = self
            .run(
                |mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await },
            )
            .await;
        let first = !self.checked.swap(true, Ordering::AcqRel);
        match &result {
            Ok(_) => self.set_up(true),
            Err(error) if first => tracing::warn!(
                redis = %self.url_for_logs,
                %error,
                "redis unreachable at start; serving from the seed, counting in memory, reconnecting in the background"
            ),
            Err(_) => {}
        }
        result.map(|_| ())
    }

    /// Checks Redis every `interval` (faster while it is down) and calls `on_up` on each recovery.
    pub fn spawn_health_loop(
        self: &Arc<Self>,
        interval: Duration,
        on_up: impl Fn() + Send + 'static,
    ) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(store) = store.upgrade() else { return };
                let was_up = store.is_up();
                let now_up = store.ping().await.is_ok();
                if now_up && !was_up {
                    on_up();
                }
                drop(store);
                tokio::time::sleep(interval).await;
            }
        });
    }

    /// GET and PTTL of one string key, in one round trip.
    pub async fn get_record(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.get_records(&[key]).await?.pop().unwrap_or(Ok(None))
    }

    /// GET and PTTL of several string keys, in one round trip. Each key has its own result: one
    /// key of the wrong type is that key's `Rejected`, not a failure of the others.
    pub async fn get_records(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<Option<Record>, StoreError>>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("GET").arg(*key).cmd("PTTL").arg(*key);
        }
        let values: Vec<Value> = self
            .run(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let mut values = values.into_iter();
        let mut records = Vec::with_capacity(keys.len());
        for _ in keys {
            let (value, ttl) = (values.next(), values.next());
            records.push(record(value, ttl));
        }
        Ok(records)
    }

    /// Writes seed copies with a TTL, leaving records an operator made persistent alone, `chunk`
    /// scripts per round trip. Returns the indexes of the items not written: a chunk that fails does
    /// not stop the others, and once Redis is marked down the rest are left for the next try.
    pub async fn put_seed_copies(
        &self,
        items: &[(String, String)],
        ttl_secs: u64,
        chunk: usize,
    ) -> Vec<usize> {
        let chunk = chunk.max(1);
        let ttl = ttl_secs.to_string();
        let mut failed = Vec::new();
        for (n, part) in items.chunks(chunk).enumerate() {
            let first = n * chunk;
            if !self.is_up() {
                failed.extend(first..items.len());
                break;
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (key, value) in part {
                evalsha(
                    &mut pipe,
                    &scripts::SET_UNLESS_PERSISTENT,
                    &[key.as_str()],
                    &[value.as_str(), ttl.as_str()],
                );
            }
            match self
                .query_scripts(&pipe, &[&scripts::SET_UNLESS_PERSISTENT])
                .await
            {
                Ok(values) => {
                    for i in 0..part.len() {
                        if !matches!(values.get(i), Some(Value::Int(_))) {
                            failed.push(first + i);
                        }
                    }
                }
                Err(_) => failed.extend(first..first + part.len()),
            }
        }
        failed
    }

    /// Applies a counter batch, one script call per consumer, all in one round trip. Each consumer's
    /// share has its own outcome, so one bad key holds back only its own consumer. `Err` means the
    /// round trip itself failed: whether any share was applied is then unknown.
    pub async fn apply_batch(
        &self,
        instance: &str,
        retention_secs: u64,
        ledger_ttl_secs: u64,
        batch: &[ConsumerBatch],
    ) -> Result<Vec<ShareOutcome>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let (retention, ledger_ttl) = (retention_secs.to_string(), ledger_ttl_secs.to_string());
        for consumer in batch {
            let mut keys = vec![keys::tdl_applied(&consumer.username, instance)];
            let mut args = vec![
                consumer.seq.to_string(),
                retention.clone(),
                ledger_ttl.clone(),
            ];
            for counter in &consumer.counters {
                keys.push(keys::tdl_counter(
                    &consumer.username,
                    &counter.entry,
                    counter.date,
                ));
                keys.push(keys::tdl_entries(&consumer.username, counter.date));
                let fields: Vec<(usize, u64)> = counter
                    .slots
                    .iter()
                    .copied()
                    .enumerate()
                    .filter(|(_, n)| *n > 0)
                    .collect();
                args.push(counter.entry.to_string());
                args.push(fields.len().to_string());
                for (slot, n) in fields {
                    args.push(format!("T{}", slot + 1));
                    args.push(n.to_string());
                }
            }
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            evalsha(&mut pipe, &scripts::APPLY_BATCH, &keys, &args);
        }
        let values = self.query_scripts(&pipe, &[&scripts::APPLY_BATCH]).await?;
        if values.len() != batch.len() {
            return Err(StoreError::Rejected(format!(
                "{} replies for {} scripts",
                values.len(),
                batch.len()
            )));
        }
        let outcomes: Vec<ShareOutcome> = values.into_iter().map(share_outcome).collect();
        let failed = outcomes
            .iter()
            .filter(|o| !matches!(o, ShareOutcome::Applied))
            .count();
        self.errors.increment(failed as u64);
        Ok(outcomes)
    }

    /// Today's counters of a consumer: the given entries plus any other entry used that day, and
    /// this instance's ledger, read in one atomic step (one script), so no concurrent write can be
    /// seen in part.
    pub async fn read_usage(
        &self,
        username: &str,
        date: Date,
        instance: &str,
        known_entries: &[&str],
    ) -> Result<StoredUsage, StoreError> {
        let (prefix, suffix) = keys::tdl_counter_affixes(username, date);
        let mut key_names = vec![
            keys::tdl_entries(username, date),
            keys::tdl_applied(username, instance),
        ];
        key_names.extend(
            known_entries
                .iter()
                .map(|id| keys::tdl_counter(username, id, date)),
        );
        let key_names: Vec<&str> = key_names.iter().map(String::as_str).collect();
        let mut args = vec![prefix.as_str(), suffix.as_str()];
        args.extend_from_slice(known_entries);
        let reply = self.script(&scripts::READ_USAGE, &key_names, &args).await?;
        let usage = parse_usage(reply);
        if usage.is_err() {
            self.errors.increment(1);
        }
        usage
    }

    /// Asks for `want` more request quota in a window (see [`scripts::QUOTA_LEASE`]): returns the
    /// replica's holding and the total reserved by all replicas after the call.
    pub async fn quota_lease(
        &self,
        key: &str,
        instance: &str,
        believed: u64,
        want: u64,
        limit: u64,
        ttl_secs: u64,
    ) -> Result<QuotaReply, StoreError> {
        let args = [
            instance.to_owned(),
            believed.to_string(),
            want.to_string(),
            limit.to_string(),
            ttl_secs.to_string(),
        ];
        self.quota_script(&scripts::QUOTA_LEASE, key, &args).await
    }

    /// Sets the replica's holding in a window to `used` (see [`scripts::QUOTA_SYNC`]).
    pub async fn quota_sync(
        &self,
        key: &str,
        instance: &str,
        used: u64,
        ttl_secs: u64,
    ) -> Result<QuotaReply, StoreError> {
        let args = [instance.to_owned(), used.to_string(), ttl_secs.to_string()];
        self.quota_script(&scripts::QUOTA_SYNC, key, &args).await
    }

    async fn quota_script(
        &self,
        lua: &Lua,
        key: &str,
        args: &[String],
    ) -> Result<QuotaReply, StoreError> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = self.script(lua, &[key], &args).await?;
        let parsed = match &reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(held), Value::Int(total)] if *held >= 0 => Some(QuotaReply {
                    held: u64::try_from(*held).unwrap_or(0),
                    total: u64::try_from(*total).unwrap_or(0),
                }),
                _ => None,
            },
            _ => None,
        };
        parsed.ok_or_else(|| {
            self.errors.increment(1);
            StoreError::Rejected(format!("quota key {key}: {reply:?}"))
        })
    }

    /// One script's reply (loaded again if Redis lost it).
    async fn script(&self, lua: &Lua, keys: &[&str], args: &[&str]) -> Result<Value, StoreError> {
        self.script_within(Patience::Hot, lua, keys, args).await
    }

    async fn script_within(
        &self,
        patience: Patience,
        lua: &Lua,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        evalsha(&mut pipe, lua, keys, args);
        Ok(self
            .query_scripts_within(patience, &pipe, &[lua])
            .await?
            .pop()
            .unwrap_or(Value::Nil))
    }

    /// Runs a pipeline of EVALSHAs (built with `ignore_errors`, so each command has its own reply);
    /// if Redis lost its script cache, loads the scripts and runs it once more. That is safe because
    /// every script is idempotent: a share applied by the first run is a no-op in the second.
    async fn query_scripts(
        &self,
        pipe: &Pipeline,
        used: &[&Lua],
    ) -> Result<Vec<Value>, StoreError> {
        self.query_scripts_within(Patience::Hot, pipe, used).await
    }

    async fn query_scripts_within(
        &self,
        patience: Patience,
        pipe: &Pipeline,
        used: &[&Lua],
    ) -> Result<Vec<Value>, StoreError> {
        let first = self
            .run_within(patience, |mut conn| async move {
                pipe.query_async::<Vec<Value>>(&mut conn).await
            })
            .await;
        match first {
            Ok(values) if !values.iter().any(is_noscript) => return Ok(values),
            Ok(_) | Err(StoreError::NoScript) => {}
            Err(error) => return Err(error),
        }
        for lua in used {
            let source = lua.source;
            self.run(|mut conn| async move {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(source)
                    .query_async::<String>(&mut conn)
                    .await
            })
            .await?;
        }
        self.run_within(patience, |mut conn| async move {
            pipe.query_async::<Vec<Value>>(&mut conn).await
        })
        .await
    }
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

/// The bytes of a string reply.
fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// A GET and PTTL reply pair as a record.
fn record(value: Option<Value>, ttl: Option<Value>) -> Result<Option<Record>, StoreError> {
    let persistent = match ttl {
        Some(Value::Int(ttl)) => ttl == -1,
        Some(Value::ServerError(e)) => return Err(StoreError::Rejected(e.to_string())),
        other => return Err(StoreError::Rejected(format!("PTTL answered {other:?}"))),
    };
    match value {
        Some(Value::Nil) => Ok(None),
        Some(Value::ServerError(e)) => Err(StoreError::Rejected(e.to_string())),
        Some(v) => match bytes(&v).map(|b| String::from_utf8(b.to_vec())) {
            Some(Ok(value)) => Ok(Some(Record { value, persistent })),
            Some(Err(_)) => Err(StoreError::Rejected("not UTF-8".into())),
            None => Err(StoreError::Rejected(format!("GET answered {v:?}"))),
        },
        None => Err(StoreError::Rejected("no reply".into())),
    }
}

fn share_outcome(value: Value) -> ShareOutcome {
    match value {
        Value::Int(_) => ShareOutcome::Applied,
        Value::Array(parts) if parts.len() == 3 && bytes(&parts[0]) == Some(b"refused") => {
            let text =
                |v: &Value| String::from_utf8_lossy(bytes(v).unwrap_or_default()).into_owned();
            ShareOutcome::Refused {
                key: text(&parts[1]),
                reason: text(&parts[2]),
            }
        }
        Value::ServerError(e) => ShareOutcome::Failed(e.to_string()),
        other => ShareOutcome::Failed(format!("unexpected reply {other:?}")),
    }
}

/// A count as stored: absent is 0; anything but a non-negative integer makes the read fail (shown
/// as incomplete) rather than be taken as a wrong number.
fn stored_count(value: &Value) -> Result<u64, StoreError> {
    match value {
        Value::Nil => Ok(0),
        Value::Int(n) => u64::try_from(*n).map_err(|_| StoreError::Rejected(format!("count {n}"))),
        v => bytes(v)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| StoreError::Rejected(format!("not a count: {v:?}"))),
    }
}

/// The reply of [`scripts::READ_USAGE`].
fn parse_usage(reply: Value) -> Result<StoredUsage, StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(StoreError::Rejected(e.to_string())),
        other => {
            return Err(StoreError::Rejected(format!(
                "usage read answered {other:?}"
            )));
        }
    };
    let mut items = items.into_iter();
    let applied_seq = stored_count(&items.next().unwrap_or(Value::Nil))?;
    let mut entries = Vec::new();
    while let (Some(id), Some(counts)) = (items.next(), items.next()) {
        let id = bytes(&id)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| StoreError::Rejected("an entry id that is not text".into()))?
            .to_owned();
        let Value::Array(counts) = counts else {
            return Err(StoreError::Rejected(format!(
                "counts of {id} are not a list"
            )));
        };
        let mut day = [0u64; SLOTS];
        for (slot, value) in day.iter_mut().zip(&counts) {
            *slot = stored_count(value)?;
        }
        entries.push((id, day));
    }
    Ok(StoredUsage {
        entries,
        applied_seq,
    })
}

fn evalsha(pipe: &mut Pipeline, lua: &Lua, keys: &[&str], args: &[&str]) {
    pipe.cmd("EVALSHA")
        .arg(lua.sha())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
}

fn classify(error: RedisError) -> StoreError {
    if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
        return StoreError::NoScript;
    }
    let outage = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::Io | ErrorKind::Server(ServerErrorKind::BusyLoading)
        );
    if outage {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Rejected(error.to_string())
    }
}

/// The URL without a password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn usage_replies_are_read_strictly() {
        let mut counts = vec![Value::Nil; SLOTS];
        counts[6] = bulk("5");
        let reply = Value::Array(vec![
            bulk("12"),
            bulk("kt"),
            Value::Array(counts.clone()),
            bulk("other"),
            Value::Array(vec![Value::Nil; SLOTS]),
        ]);
        let usage = parse_usage(reply).unwrap();
        assert_eq!(usage.applied_seq, 12);
        assert_eq!(usage.entries.len(), 2);
        assert_eq!(usage.entries[0].0, "kt");
        assert_eq!(usage.entries[0].1[6], 5);
        assert_eq!(usage.entries[1].1, [0; SLOTS]);
        let no_ledger = Value::Array(vec![Value::Nil, bulk("kt"), Value::Array(counts.clone())]);
        assert_eq!(parse_usage(no_ledger).unwrap().applied_seq, 0);
        // A field that is not a count fails the read instead of being taken as some number.
        counts[0] = bulk("x");
        let bad = Value::Array(vec![Value::Nil, bulk("kt"), Value::Array(counts)]);
        assert!(matches!(parse_usage(bad), Err(StoreError::Rejected(_))));
        assert!(matches!(
            parse_usage(Value::Okay),
            Err(StoreError::Rejected(_))
        ));
    }

    #[test]
    fn share_replies() {
        assert_eq!(share_outcome(Value::Int(1)), ShareOutcome::Applied);
        assert_eq!(share_outcome(Value::Int(0)), ShareOutcome::Applied);
        let refused = Value::Array(vec![bulk("refused"), bulk("uma:tdl:{u}:e:d"), bulk("why")]);
        assert_eq!(
            share_outcome(refused),
            ShareOutcome::Refused {
                key: "uma:tdl:{u}:e:d".into(),
                reason: "why".into()
            }
        );
        assert!(matches!(share_outcome(Value::Nil), ShareOutcome::Failed(_)));
    }

    #[test]
    fn records_keep_their_ttl_kind() {
        let persistent = record(Some(bulk("u1")), Some(Value::Int(-1))).unwrap();
        assert_eq!(
            persistent,
            Some(Record {
                value: "u1".into(),
                persistent: true
            })
        );
        let copy = record(Some(bulk("u1")), Some(Value::Int(5000))).unwrap();
        assert!(!copy.unwrap().persistent);
        assert_eq!(
            record(Some(Value::Nil), Some(Value::Int(-2))).unwrap(),
            None
        );
        assert!(record(None, None).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
