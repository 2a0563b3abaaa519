//! Key → consumer through the lookup chain: in-process cache → Redis → seed (SPEC §1, §3).
//!
//! The cache keeps each answer fresh for `cache.local_ttl_ms` (unknown keys for
//! `cache.negative_ttl_ms`, so a flood of bad keys stays off Redis) and keeps it usable for
//! `cache.stale_ttl_secs` more: while Redis cannot be asked, the last record seen still serves,
//! then the seed; only a key in no local source gets "cannot decide" (503).
//!
//! Redis rules (SPEC §3): a record without a TTL belongs to an operator and wins over the seed. A
//! record with a TTL is a seed copy, and a copy never stands in for the running seed: for a key or
//! consumer the seed has, the seed answers unless an operator record exists — whatever an older
//! seed or another replica left in Redis, and whether or not rewriting the copies at start has
//! succeeded yet. A copy of a key the seed no longer has is not honoured either (deleting a key
//! from the seed revokes it on restart). A seed answer whose copy Redis lacks is written back
//! (SETEX); stale copies are rewritten at start (`service::spawn_seed_copies`), not here, so two
//! replicas running different seeds during a rollout do not rewrite each other's on every lookup.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[cfg(test)]
use jiff::SignedDuration;
use jiff::Timestamp;
use metrics::{Counter, counter};
use rustc_hash::FxHashMap;

use crate::config::CacheSettings;
use crate::core::decide::Catalog;
use crate::core::{Consumer, KeyHash};
use crate::seed::record::{self, ConsumerRecord, KeyValue};
use crate::store::{Record, RedisStore, StoreError, keys};

/// What a key resolves to. A seed consumer is lent from the catalog, not cloned: its reference
/// count is shared by every request and would bounce between cores.
#[derive(Debug, Clone)]
pub enum Resolution<'c> {
    Consumer(Cow<'c, Arc<Consumer>>),
    Unknown,
    /// Redis cannot be asked and no local source knows the key.
    Unavailable,
}

#[derive(Clone)]
struct Cached {
    consumer: Option<Arc<Consumer>>,
    fresh_until: Instant,
    /// The resolver's invalidation epoch when the answer was read: a copy from an earlier epoch is
    /// never served as fresh (see [`Resolver::invalidate`]).
    epoch: u64,
    /// When the key expires (an operator's `expires_at`): never served past it, fresh or stale.
    expires: Option<Instant>,
}

impl Cached {
    fn answer(&self, now: Instant) -> Resolution<'static> {
        match &self.consumer {
            Some(_) if self.expires.is_some_and(|t| t <= now) => Resolution::Unknown,
            Some(consumer) => Resolution::Consumer(Cow::Owned(consumer.clone())),
            None => Resolution::Unknown,
        }
    }
}

/// What Redis says a key opens, and until when.
struct Found {
    consumer: Option<Arc<Consumer>>,
    expires: Option<Timestamp>,
}

impl Found {
    fn consumer(consumer: Option<Arc<Consumer>>) -> Found {
        Found {
            consumer,
            expires: None,
        }
    }
}

thread_local! {
    /// Fresh answers held by each worker thread as its own copies: returning an `Arc` that every
    /// thread shares would bounce its reference count between cores on every request.
    static LOCAL: RefCell<FxHashMap<(u64, KeyHash), Cached>> = RefCell::default();
}

/// Per-thread bound; past it the thread's copies are dropped and refilled from the shared cache.
const LOCAL_LIMIT: usize = 4096;

fn local_get(resolver: u64, key: &KeyHash, now: Instant, epoch: u64) -> Option<Cached> {
    LOCAL.with(|local| {
        local
            .borrow()
            .get(&(resolver, *key))
            .filter(|c| c.fresh_until > now && c.epoch == epoch)
            .cloned()
    })
}

/// `epoch` is the one read before `cached` was: a copy can only be older than its epoch says.
fn local_put(resolver: u64, key: KeyHash, cached: &Cached, epoch: u64) {
    let copy = Cached {
        consumer: cached
            .consumer
            .as_ref()
            .map(|c| Arc::new(Consumer::clone(c))),
        fresh_until: cached.fresh_until,
        epoch,
        expires: cached.expires,
    };
    LOCAL.with(|local| {
        let mut local = local.borrow_mut();
        if local.len() >= LOCAL_LIMIT {
            local.clear();
        }
        local.insert((resolver, key), copy);
    });
}

pub struct Resolver {
    /// Tells this resolver's per-thread copies from another's (tests run several in one process).
    id: u64,
    store: Option<Arc<RedisStore>>,
    cache: moka::sync::Cache<KeyHash, Cached, rustc_hash::FxBuildHasher>,
    fresh: Duration,
    negative: Duration,
    seed_copy_ttl_secs: u64,
    corrupt: Counter,
    /// Bumped by every invalidation: per-thread copies of an earlier epoch are dropped on sight, and
    /// an answer read from Redis while an invalidation ran is kept only as a stale fallback.
    epoch: AtomicU64,
}

impl Resolver {
    pub fn new(
        store: Option<Arc<RedisStore>>,
        settings: &CacheSettings,
        seed_copy_ttl_secs: u64,
    ) -> Resolver {
        let fresh = Duration::from_millis(settings.local_ttl_ms);
        let cache = moka::sync::Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(fresh + Duration::from_secs(settings.stale_ttl_secs))
            .support_invalidation_closures()
            .build_with_hasher(rustc_hash::FxBuildHasher);
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Resolver {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            store,
            cache,
            fresh,
            negative: Duration::from_millis(settings.negative_ttl_ms),
            seed_copy_ttl_secs,
            corrupt: counter!("uma_redis_corrupt_records_total"),
            epoch: AtomicU64::new(0),
        }
    }

    /// Forgets every cached answer, in the shared cache and in every thread's copies (a seed
    /// reload, a pub/sub (re)subscription: a message may have been missed).
    pub fn invalidate_all(&self) {
        self.invalidate(&Invalidation::All);
    }

    /// Forgets the cached answers `target` may have changed.
    pub fn invalidate(&self, target: &Invalidation) {
        match target {
            Invalidation::Key(key) => self.cache.invalidate(key),
            Invalidation::Consumer(username) => {
                let username = username.clone();
                // Registered, then applied lazily: no read after this returns sees a match.
                if self
                    .cache
                    .invalidate_entries_if(move |_, c| {
                        c.consumer
                            .as_ref()
                            .is_some_and(|c| *c.username == *username)
                    })
                    .is_err()
                {
                    self.cache.invalidate_all();
                }
            }
            Invalidation::All => self.cache.invalidate_all(),
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub async fn resolve<'c>(&self, catalog: &'c Catalog, key: KeyHash) -> Resolution<'c> {
        let Some(store) = &self.store else {
            // Embedded mode: the seed is the only source, already in memory.
            return match catalog.by_key.get(&key) {
                Some(consumer) => Resolution::Consumer(Cow::Borrowed(consumer)),
                None => Resolution::Unknown,
            };
        };
        let now = Instant::now();
        // Read before any cached answer: one read after an invalidation is then never taken for
        // fresh by this call or stored as fresh for later ones.
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some(local) = local_get(self.id, &key, now, epoch) {
            return local.answer(now);
        }
        let cached = self.cache.get(&key);
        if let Some(c) = cached.as_ref().filter(|c| c.fresh_until > now) {
            local_put(self.id, key, c, epoch);
            return c.answer(now);
        }
        if store.is_up()
            && let Ok(found) = self.ask_redis(store, catalog, &key).await
        {
            let ttl = if found.consumer.is_some() {
                self.fresh
            } else {
                self.negative
            };
            let read_at = Instant::now();
            let expires = found.expires.map(|t| instant_of(t, read_at));
            // An invalidation that ran during the read may concern what was read: keep the answer
            // as a fallback only, and read again next time.
            let unsettled = self.epoch.load(Ordering::Acquire) != epoch;
            let mut fresh_until = if unsettled { read_at } else { read_at + ttl };
            if let Some(expires) = expires {
                fresh_until = fresh_until.min(expires);
            }
            let entry = Cached {
                consumer: found.consumer,
                fresh_until,
                epoch,
                expires,
            };
            let resolution = entry.answer(read_at);
            self.cache.insert(key, entry);
            return resolution;
        }
        // Redis cannot be asked: the last answer it gave, else the seed, else we cannot decide.
        match (cached, catalog.by_key.get(&key)) {
            (Some(c), _) => c.answer(now),
            (None, Some(seed)) => Resolution::Consumer(Cow::Borrowed(seed)),
            (None, None) => Resolution::Unavailable,
        }
    }

    /// The consumer named `username` (for a usage record): an operator's record in Redis wins,
    /// then the seed; the seed alone while Redis cannot be asked.
    pub async fn consumer_named(
        &self,
        catalog: &Catalog,
        username: &str,
    ) -> Result<Option<Arc<Consumer>>, StoreError> {
        match &self.store {
            Some(store) if store.is_up() => self.consumer(store, catalog, username, None).await,
            _ => Ok(catalog.by_name.get(username).cloned()),
        }
    }

    async fn ask_redis(
        &self,
        store: &Arc<RedisStore>,
        catalog: &Catalog,
        key: &KeyHash,
    ) -> Result<Found, StoreError> {
        let key_name = keys::key_record(key);
        let Some(seed) = catalog.by_key.get(key) else {
            // Not a seed key: only an operator's record (no TTL) can make it known.
            let key_record = self.readable(store.get_record(&key_name).await, &key_name)?;
            return match self.operator_key(key_record.as_ref(), &key_name) {
                OperatorKey::Opens { username, expires } => Ok(Found {
                    consumer: self.consumer(store, catalog, &username, None).await?,
                    expires,
                }),
                OperatorKey::Refused | OperatorKey::None => Ok(Found::consumer(None)),
            };
        };
        // A seed key: its record and the seed consumer's, in one round trip.
        let record_name = keys::consumer_record(&seed.username);
        let mut records = store
            .get_records(&[key_name.as_str(), record_name.as_str()])
            .await?
            .into_iter();
        let key_record = self.readable(records.next().unwrap_or(Ok(None)), &key_name)?;
        let consumer_record = self.readable(records.next().unwrap_or(Ok(None)), &record_name)?;
        let expires = match self.operator_key(key_record.as_ref(), &key_name) {
            // Revoked, disabled or expired by an operator: refused like an unknown key.
            OperatorKey::Refused => return Ok(Found::consumer(None)),
            OperatorKey::Opens { username, expires } if username != *seed.username => {
                // An operator gave the key to another consumer.
                return Ok(Found {
                    consumer: self.consumer(store, catalog, &username, None).await?,
                    expires,
                });
            }
            OperatorKey::Opens { expires, .. } => expires,
            OperatorKey::None => None,
        };
        if key_record.is_none() {
            self.write_back(store, key_name, seed.username.to_string());
        }
        Ok(Found {
            consumer: self
                .consumer(store, catalog, &seed.username, Some(consumer_record))
                .await?,
            expires,
        })
    }

    /// What an operator's key record (no TTL) says; a seed copy says nothing: it never stands in
    /// for the running seed.
    fn operator_key(&self, record: Option<&Record>, key_name: &str) -> OperatorKey {
        let Some(record) = record.filter(|r| r.persistent) else {
            return OperatorKey::None;
        };
        match record::read_key(&record.value) {
            Some(KeyValue::Pointer(username)) => OperatorKey::Opens {
                username,
                expires: None,
            },
            Some(KeyValue::Record(r)) if r.active_at(Timestamp::now()) => OperatorKey::Opens {
                username: r.username,
                expires: r.expires_at,
            },
            Some(KeyValue::Record(_)) => OperatorKey::Refused,
            None => {
                self.corrupt.increment(1);
                tracing::warn!(key = %key_name, "invalid key record in Redis; treated as missing");
                OperatorKey::None
            }
        }
    }

    /// The consumer named `username`: an operator record wins, then the seed; a seed copy (a
    /// record with a TTL) never answers. `record` is its Redis record when already read.
    async fn consumer(
        &self,
        store: &Arc<RedisStore>,
        catalog: &Catalog,
        username: &str,
        record: Option<Option<Record>>,
    ) -> Result<Option<Arc<Consumer>>, StoreError> {
        let record_name = keys::consumer_record(username);
        let record = match record {
            Some(record) => record,
            None => self.readable(store.get_record(&record_name).await, &record_name)?,
        };
        if let Some(r) = record.as_ref().filter(|r| r.persistent) {
            match record::read(&r.value, &record_name) {
                Ok(ConsumerRecord::Live(consumer)) if *consumer.username == *username => {
                    return Ok(Some(Arc::from(consumer)));
                }
                // Deleted by an operator: gone, whatever the seed says (SPEC §10).
                Ok(ConsumerRecord::Deleted(name)) if name == username => return Ok(None),
                Ok(_) | Err(_) => {
                    self.corrupt.increment(1);
                    tracing::warn!(key = %record_name, "invalid consumer record in Redis; treated as missing");
                }
            }
        }
        let Some(seed) = catalog.by_name.get(username) else {
            // Unknown, or a seed copy of a consumer the running seed no longer has: revoked.
            return Ok(None);
        };
        if record.is_none() {
            self.write_back(store, record_name, record::to_json(seed));
        }
        Ok(Some(seed.clone()))
    }

    /// A value Redis refuses to read as a string (an operator wrote another type) is a corrupt
    /// record: treated as missing, so the seed answers.
    fn readable(
        &self,
        read: Result<Option<Record>, StoreError>,
        key: &str,
    ) -> Result<Option<Record>, StoreError> {
        match read {
            Err(StoreError::Rejected(error)) => {
                self.corrupt.increment(1);
                tracing::warn!(%key, %error, "unreadable record in Redis; treated as missing");
                Ok(None)
            }
            other => other,
        }
    }

    /// Fire-and-forget SETEX of a seed copy: the answer does not wait for it.
    fn write_back(&self, store: &Arc<RedisStore>, key: String, value: String) {
        let store = store.clone();
        let ttl = self.seed_copy_ttl_secs;
        tokio::spawn(async move {
            if !store
                .put_seed_copies(&[(key, value)], ttl, 1)
                .await
                .is_empty()
            {
                tracing::debug!(
                    "seed write-back failed; the start-up rewrite or a later lookup retries it"
                );
            }
        });
    }
}

/// What an invalidation message (or a local admin write) says may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Key(KeyHash),
    Consumer(Arc<str>),
    All,
}

/// What an operator's key record says about a key.
enum OperatorKey {
    /// No operator record: the seed decides.
    None,
    /// The key opens `username`'s consumer, until `expires` if set.
    Opens {
        username: String,
        expires: Option<Timestamp>,
    },
    /// Disabled, revoked or expired.
    Refused,
}

/// The monotonic instant of a wall-clock time (`now` if it has passed).
fn instant_of(at: Timestamp, now: Instant) -> Instant {
    let left = at.duration_since(Timestamp::now());
    match Duration::try_from(left) {
        Ok(left) => now
            .checked_add(left)
            .unwrap_or(now + Duration::from_secs(86_400 * 365)),
        Err(_) => now,
    }
}

impl Invalidation {
    /// A message of the invalidation channel: `key <sha256 hex>`, `consumer <username>`, `all`.
    pub fn parse(message: &str) -> Option<Invalidation> {
        match message.split_once(' ') {
            Some(("key", hex)) => KeyHash::from_hex(hex).map(Invalidation::Key),
            Some(("consumer", name)) if !name.is_empty() => {
                Some(Invalidation::Consumer(Arc::from(name)))
            }
            None if message == "all" => Some(Invalidation::All),
            _ => None,
        }
    }

    /// The message that says this.
    pub fn message(&self) -> String {
        match self {
            Invalidation::Key(key) => format!("key {}", key.to_hex()),
            Invalidation::Consumer(name) => format!("consumer {name}"),
            Invalidation::All => "all".into(),
        }
    }
}

/// Every seed copy to write at start: each consumer's record and each key's pointer to it.
pub fn seed_copies(catalog: &Catalog) -> Vec<(String, String)> {
    let mut items: Vec<(String, String)> = catalog
        .consumers
        .iter()
        .map(|c| (keys::consumer_record(&c.username), record::to_json(c)))
        .collect();
    items.extend(
        catalog
            .by_key
            .iter()
            .map(|(hash, c)| (keys::key_record(hash), c.username.to_string())),
    );
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_messages_round_trip() {
        for target in [
            Invalidation::Key(KeyHash::of("k")),
            Invalidation::Consumer(Arc::from("alice")),
            Invalidation::All,
        ] {
            assert_eq!(Invalidation::parse(&target.message()), Some(target));
        }
        assert_eq!(Invalidation::parse("key nothex"), None);
        assert_eq!(Invalidation::parse("consumer "), None);
        assert_eq!(Invalidation::parse("bogus"), None);
    }

    #[test]
    fn an_expired_copy_never_answers() {
        let now = Instant::now();
        let consumer =
            Arc::new(Consumer::new("u".into(), None, Vec::new(), None).expect("a valid consumer"));
        let cached = Cached {
            consumer: Some(consumer),
            fresh_until: now + Duration::from_secs(5),
            epoch: 0,
            expires: Some(now + Duration::from_secs(1)),
        };
        assert!(matches!(cached.answer(now), Resolution::Consumer(_)));
        assert!(matches!(
            cached.answer(now + Duration::from_secs(1)),
            Resolution::Unknown
        ));
        let past = Timestamp::now() - SignedDuration::from_secs(3);
        assert_eq!(instant_of(past, now), now);
    }
}
