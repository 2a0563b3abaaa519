//! TDL usage counters: allowed calls per consumer, entry, local date and two-hour slot (SPEC §7).
//!
//! Slots are reckoned in the configured IANA zone from civil (local) time, so a zone such as
//! Asia/Seoul rolls its date at local midnight. Increments always land in memory first, indexed by
//! consumer, so that one consumer's counts (for `/api/tdl-matrix`, or one write) are found without
//! looking at anyone else's under the lock every allowed call takes.
//!
//! **Embedded mode** (no Redis): memory is where counts live. Days past the retention period are
//! pruned, and the number of stored counters is bounded by `tdl.max_history_keys`: past it the
//! oldest days are evicted first, so a long history never crowds out today's counts.
//!
//! **Redis mode**: a single flusher writes each consumer's pending increments as a *share*: every
//! `flush_interval_ms` (`async`), or as soon as a call waits for its increment (`sync`, several
//! waiting calls sharing one write). Each share carries a sequence number of this process, and the
//! Redis side applies it only if the number is newer than the one in the consumer's ledger for
//! this process; a consumer has at most one share in flight, retried unchanged until Redis
//! confirms it, so a share whose first write timed out is never applied twice. Consumers are
//! independent: a share Redis refuses (a key of the wrong type; nothing is written) goes back to
//! pending and is sent again later, while every other consumer's counts keep flowing.
//!
//! **Reading** (`/api/tdl-matrix`): Redis's counts plus this process's increments Redis does not
//! have yet, read in one atomic step and ordered with the flusher, so the sum never counts an
//! increment twice or not at all. What was read is remembered per consumer and day: while Redis
//! cannot be read the answer is that, plus what this process counted since, so a count one replica
//! shows never goes backwards.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashbrown::Equivalent;
use hashbrown::hash_map::EntryRef;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use metrics::{Counter, Gauge, counter, gauge};
use rustc_hash::FxBuildHasher;
use tokio::sync::{Notify, RwLock, oneshot};

use crate::clock::Clock;
use crate::config::{TdlMode, TdlSettings};
use crate::core::model::SLOTS;
use crate::store::{
    ConsumerBatch, CounterDelta, RedisStore, ShareOutcome, StoreError, StoredUsage,
};

/// Longest a ledger key of this process outlives its last write. A ledger only has to outlast
/// the retries of a share whose write timed out (while this process runs and cannot reach Redis),
/// so a day is plenty, and every process that ever ran does not leave one key per consumer for the
/// whole retention period.
const LEDGER_TTL_SECS: u64 = 86_400;

/// A refused key is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A local date and slot (1 = 00:00–01:59 … 12 = 22:00–23:59).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotStamp {
    pub date: Date,
    pub slot: u8,
}

impl SlotStamp {
    pub fn at(now: jiff::Timestamp, zone: &TimeZone) -> SlotStamp {
        let local = zone.to_datetime(now);
        SlotStamp {
            date: local.date(),
            slot: (local.hour() / 2) as u8 + 1,
        }
    }

    pub fn slot_name(&self) -> String {
        format!("T{}", self.slot)
    }
}

/// Counts per slot of one day.
pub type DayUsage = [u64; SLOTS];

/// A consumer's counts for one day, as `/api/tdl-matrix` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The known entries first, in the order given, then any other entry used that day.
    pub entries: Vec<(String, DayUsage)>,
    /// Whether Redis was read for this answer (always true in embedded mode: memory is the store).
    pub complete: bool,
}

type HashMap<K, V> = hashbrown::HashMap<K, V, FxBuildHasher>;

/// (consumer, entry id) of a counter, as the embedded index by date lists it.
type CounterName = (Arc<str>, Arc<str>);

/// One of a consumer's counters: entry id and local date.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EntryDay {
    entry: Arc<str>,
    date: Date,
}

/// A borrowed [`EntryDay`] (same hash), so counting an existing counter clones nothing: cloning
/// the `Arc` would touch a reference count every worker thread shares.
#[derive(Hash)]
struct EntryDayRef<'a> {
    entry: &'a str,
    date: Date,
}

impl Equivalent<EntryDay> for EntryDayRef<'_> {
    fn equivalent(&self, key: &EntryDay) -> bool {
        self.date == key.date && self.entry == &*key.entry
    }
}

/// One consumer's increments sent as one script call under one sequence number; retried unchanged
/// until Redis confirms or refuses it.
struct Share {
    seq: u64,
    counts: Vec<(EntryDay, DayUsage)>,
    /// Sync mode: the calls waiting for these increments to reach Redis.
    waiters: Vec<oneshot::Sender<()>>,
}

impl Share {
    fn to_batch(&self, username: &Arc<str>) -> ConsumerBatch {
        ConsumerBatch {
            username: username.clone(),
            seq: self.seq,
            counters: self
                .counts
                .iter()
                .map(|(key, slots)| CounterDelta {
                    entry: key.entry.clone(),
                    date: key.date,
                    slots: *slots,
                })
                .collect(),
        }
    }

    fn increments(&self) -> u64 {
        self.counts.iter().flat_map(|(_, day)| day).sum()
    }
}

/// What the last answer with Redis read for a consumer's day, so an answer without Redis can
/// start from it.
struct Shown {
    date: Date,
    /// Every replica's counts as read.
    base: Vec<(String, DayUsage)>,
    /// This process's shares up to this sequence are in `base`.
    base_seq: u64,
    /// This process's shares confirmed after the read whose counts `base` lacks.
    since: Vec<(Arc<str>, DayUsage)>,
}

/// One consumer's counters.
#[derive(Default)]
struct ConsumerCounts {
    /// Embedded mode: every count. Redis mode: increments not yet in a share.
    pending: HashMap<EntryDay, DayUsage>,
    /// Sync mode: calls waiting for `pending` to reach Redis.
    waiters: Vec<oneshot::Sender<()>>,
    /// The share being written (or to retry); newer increments wait in `pending` meanwhile.
    in_flight: Option<Share>,
    /// Listed in `State::queue`.
    queued: bool,
    /// Redis mode: what Redis confirmed of this process's increments (today's and the days still
    /// buffered), so an answer without Redis and without an earlier read still counts all of them.
    confirmed: Vec<(EntryDay, DayUsage)>,
    shown: Option<Box<Shown>>,
}

impl ConsumerCounts {
    fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.in_flight.is_none()
            && self.waiters.is_empty()
            && self.confirmed.is_empty()
    }
}

#[derive(Default)]
struct State {
    consumers: HashMap<Arc<str>, ConsumerCounts>,
    /// Counters held (pending and in flight): what both modes' bounds limit.
    keys: usize,
    /// Redis mode: increments not yet confirmed, kept as a running total for the pending gauge.
    unconfirmed: u64,
    /// Redis mode: consumers with pending increments not yet in a share.
    queue: Vec<Arc<str>>,
    /// The queue's other buffer: the flusher swaps them, so queueing on the hot path reuses
    /// capacity instead of growing a fresh vector after every flush.
    spare_queue: Vec<Arc<str>>,
    /// Redis mode: consumers with a share in flight.
    flying: Vec<Arc<str>>,
    /// Embedded mode: the counters of each date, so old days go without scanning everything.
    by_date: BTreeMap<Date, Vec<CounterName>>,
    next_seq: u64,
    /// Embedded mode: the newest date counted (pruning runs when it changes). Redis mode: the date
    /// the flusher last saw (idle consumers are swept when it changes).
    newest_date: Option<Date>,
    /// The stamp of the last UTC minute seen: a slot and a date never change within a minute
    /// (zone offsets are whole minutes), so the time-zone conversion runs once a minute.
    stamp_cache: Option<(i64, SlotStamp)>,
}

impl State {
    fn stamp_at(&mut self, now: jiff::Timestamp, zone: &TimeZone) -> SlotStamp {
        let minute = now.as_second().div_euclid(60);
        match self.stamp_cache {
            Some((cached, stamp)) if cached == minute => stamp,
            _ => {
                let stamp = SlotStamp::at(now, zone);
                self.stamp_cache = Some((minute, stamp));
                stamp
            }
        }
    }

    /// Lets every call waiting on pending increments go: they stay buffered and are written later.
    fn release_waiters(&mut self) {
        for name in &self.queue {
            if let Some(c) = self.consumers.get_mut(&**name) {
                c.waiters.clear();
            }
        }
    }
}

/// Where counters go when Redis is configured.
struct Sink {
    store: Arc<RedisStore>,
    /// Distinguishes this process's shares from every other replica's and restart's.
    instance: String,
    mode: TdlMode,
    wake: Notify,
    flush_interval: Duration,
    retention_secs: u64,
    ledger_ttl_secs: u64,
    /// Orders writes with `/api/tdl-matrix` reads: between a read's look at memory and its
    /// remembering what Redis said, no share of this process is formed or settled, so the two
    /// always describe the same moment.
    gate: RwLock<()>,
    /// When each refused key was last logged.
    logged: Mutex<HashMap<String, Instant>>,
}

/// The counters of one service process.
pub struct TdlCounters {
    zone: TimeZone,
    clock: Arc<dyn Clock>,
    retention_days: i64,
    max_pending_keys: usize,
    max_history_keys: usize,
    state: Mutex<State>,
    sink: Option<Sink>,
    increments: Counter,
    dropped: Counter,
    evicted: Counter,
    rejected: Counter,
    pending_gauge: Gauge,
}

impl TdlCounters {
    pub fn new(
        zone: TimeZone,
        clock: Arc<dyn Clock>,
        settings: &TdlSettings,
        store: Option<Arc<RedisStore>>,
    ) -> TdlCounters {
        let retention_secs = u64::from(settings.retention_days).saturating_mul(86_400);
        let sink = store.map(|store| {
            let instance = instance_id();
            tracing::info!(%instance, "TDL counters are written to Redis under this instance id");
            Sink {
                store,
                instance,
                mode: settings.mode,
                wake: Notify::new(),
                flush_interval: Duration::from_millis(settings.flush_interval_ms),
                retention_secs,
                ledger_ttl_secs: retention_secs.clamp(1, LEDGER_TTL_SECS),
                gate: RwLock::new(()),
                logged: Mutex::default(),
            }
        });
        TdlCounters {
            zone,
            clock,
            retention_days: i64::from(settings.retention_days),
            max_pending_keys: settings.max_pending_keys,
            max_history_keys: settings.max_history_keys,
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
            sink,
            increments: counter!("uma_tdl_increments_total"),
            dropped: counter!("uma_tdl_dropped_total"),
            evicted: counter!("uma_tdl_evicted_total"),
            rejected: counter!("uma_tdl_rejected_writes_total"),
            pending_gauge: gauge!("uma_tdl_pending_increments"),
        }
    }

    pub fn zone(&self) -> &TimeZone {
        &self.zone
    }

    pub fn now(&self) -> SlotStamp {
        SlotStamp::at(self.clock.now(), &self.zone)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one allowed call, now. In sync mode with Redis up, returns a receiver that completes
    /// when the increment is in Redis (or closes when it cannot get there soon; then it is buffered).
    pub fn record(&self, consumer: &Arc<str>, entry: &Arc<str>) -> Option<oneshot::Receiver<()>> {
        let now = self.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let stamp = state.stamp_at(now, &self.zone);
        if self.sink.is_none() && state.newest_date.is_none_or(|d| d < stamp.date) {
            state.newest_date = Some(stamp.date);
            self.prune(state, stamp.date);
        }
        let slot = usize::from(stamp.slot) - 1;
        let lookup = EntryDayRef {
            entry,
            date: stamp.date,
        };
        // The usual case, an existing counter: two lookups, nothing cloned.
        let hit = if let Some((name, c)) = state.consumers.get_key_value_mut(&**consumer)
            && let Some(day) = c.pending.get_mut(&lookup)
        {
            day[slot] += 1;
            Some((name, c))
        } else {
            None
        };
        let (name, c) = match hit {
            Some(hit) => hit,
            None => {
                if !self.insert(state, consumer, entry, stamp.date, slot) {
                    drop(guard);
                    self.dropped.increment(1);
                    return None;
                }
                state.consumers.get_key_value_mut(&**consumer)?
            }
        };
        self.increments.increment(1);
        let sink = self.sink.as_ref()?;
        state.unconfirmed += 1;
        if !c.queued {
            c.queued = true;
            state.queue.push(name.clone());
        }
        if sink.mode != TdlMode::Sync || !sink.store.is_up() {
            return None;
        }
        let (done, wait) = oneshot::channel();
        c.waiters.push(done);
        drop(guard);
        sink.wake.notify_one();
        Some(wait)
    }

    /// A new counter holding one call, if the bound leaves room for it.
    fn insert(
        &self,
        state: &mut State,
        consumer: &Arc<str>,
        entry: &Arc<str>,
        date: Date,
        slot: usize,
    ) -> bool {
        if !self.admit(state, date) {
            return false;
        }
        let c = match state.consumers.entry_ref(&**consumer) {
            EntryRef::Occupied(o) => o.into_mut(),
            // A copy of the name of its own: the caller's is shared by every thread, and this one
            // is cloned whenever the consumer is queued.
            EntryRef::Vacant(v) => {
                v.insert_with_key(Arc::from(&**consumer), ConsumerCounts::default())
            }
        };
        let mut day = [0; SLOTS];
        day[slot] = 1;
        c.pending.insert(
            EntryDay {
                entry: entry.clone(),
                date,
            },
            day,
        );
        state.keys += 1;
        if self.sink.is_none() {
            state
                .by_date
                .entry(date)
                .or_default()
                .push((consumer.clone(), entry.clone()));
        }
        true
    }

    /// Whether one more counter fits. Redis mode: `tdl.max_pending_keys` bounds what waits for
    /// Redis. Embedded mode: `tdl.max_history_keys` bounds what is stored, and older days make
    /// room for today's (only a day that alone fills the bound drops new counters).
    fn admit(&self, state: &mut State, today: Date) -> bool {
        if self.sink.is_some() {
            return state.keys < self.max_pending_keys;
        }
        while state.keys >= self.max_history_keys {
            match state.by_date.keys().next().copied() {
                Some(oldest) if oldest < today => {
                    let evicted = remove_day(state, oldest);
                    self.evicted.increment(evicted as u64);
                }
                _ => return false,
            }
        }
        true
    }

    /// Embedded mode: drops the days past the retention period. Checked arithmetic: a retention
    /// reaching before the calendar's start keeps everything instead of panicking.
    fn prune(&self, state: &mut State, today: Date) {
        let keep = self.retention_days.saturating_sub(1).max(0);
        let oldest_kept = jiff::Span::new()
            .try_days(keep)
            .ok()
            .and_then(|span| today.checked_sub(span).ok());
        let Some(oldest_kept) = oldest_kept else {
            return;
        };
        while let Some(oldest) = state.by_date.keys().next().copied()
            && oldest < oldest_kept
        {
            remove_day(state, oldest);
        }
    }

    /// The consumer's counts for `date`: entry ids (at least `known`, plus any used that day).
    pub async fn usage(&self, consumer: &str, date: Date, known: &[&str]) -> Usage {
        let mut total: Vec<(String, DayUsage)> = known
            .iter()
            .map(|id| (id.to_string(), [0; SLOTS]))
            .collect();
        let Some(sink) = &self.sink else {
            if let Some(c) = self.lock().consumers.get(consumer) {
                add_counts(&mut total, &c.pending, date);
            }
            return Usage {
                entries: total,
                complete: true,
            };
        };
        if sink.store.is_up() {
            let _gate = sink.gate.read().await;
            let (pending, in_flight) = {
                let state = self.lock();
                match state.consumers.get(consumer) {
                    Some(c) => (
                        day_counts(c.pending.iter(), date),
                        c.in_flight.as_ref().map(|s| {
                            (
                                s.seq,
                                day_counts(s.counts.iter().map(|(k, v)| (k, v)), date),
                            )
                        }),
                    ),
                    None => (Vec::new(), None),
                }
            };
            if let Ok(stored) = sink
                .store
                .read_usage(consumer, date, &sink.instance, known)
                .await
            {
                add_all(
                    &mut total,
                    stored.entries.iter().map(|(id, day)| (&**id, day)),
                );
                // Behind the gate no share was formed since memory was looked at, so pending is not
                // in Redis; a share in flight is, if the ledger has its sequence.
                add_all(&mut total, pending.iter().map(|(id, day)| (&**id, day)));
                if let Some((seq, counts)) = &in_flight
                    && *seq > stored.applied_seq
                {
                    add_all(&mut total, counts.iter().map(|(id, day)| (&**id, day)));
                }
                self.remember(consumer, date, stored);
                return Usage {
                    entries: total,
                    complete: true,
                };
            }
        }
        // Redis cannot be read: the last read, plus what this process counted since; with no read
        // that day, everything this process counted.
        let state = self.lock();
        if let Some(c) = state.consumers.get(consumer) {
            let in_flight = match c.shown.as_deref().filter(|s| s.date == date) {
                Some(shown) => {
                    add_all(&mut total, shown.base.iter().map(|(id, day)| (&**id, day)));
                    add_all(&mut total, shown.since.iter().map(|(id, day)| (&**id, day)));
                    c.in_flight.as_ref().filter(|s| s.seq > shown.base_seq)
                }
                None => {
                    add_all(&mut total, dated(c.confirmed.iter(), date));
                    c.in_flight.as_ref()
                }
            };
            add_counts(&mut total, &c.pending, date);
            if let Some(share) = in_flight {
                add_all(&mut total, dated(share.counts.iter(), date));
            }
        }
        Usage {
            entries: total,
            complete: false,
        }
    }

    /// Keeps what a read found, for answers while Redis cannot be read.
    fn remember(&self, consumer: &str, date: Date, stored: StoredUsage) {
        let mut state = self.lock();
        let c = match state.consumers.entry_ref(consumer) {
            EntryRef::Occupied(o) => o.into_mut(),
            EntryRef::Vacant(v) => {
                v.insert_with_key(Arc::from(consumer), ConsumerCounts::default())
            }
        };
        c.shown = Some(Box::new(Shown {
            date,
            base: stored.entries,
            base_seq: stored.applied_seq,
            since: Vec::new(),
        }));
    }

    /// Writes what is buffered: retries the shares in flight and sends every other consumer's
    /// pending increments as a new share. Returns whether any share was confirmed.
    async fn flush_once(&self) -> Result<bool, StoreError> {
        let Some(sink) = &self.sink else {
            return Ok(false);
        };
        if !sink.store.is_up() {
            self.lock().release_waiters();
            return Err(StoreError::Unavailable("redis is down".into()));
        }
        let _gate = sink.gate.write().await;
        let batch = self.form_batch();
        if batch.is_empty() {
            return Ok(false);
        }
        match sink
            .store
            .apply_batch(
                &sink.instance,
                sink.retention_secs,
                sink.ledger_ttl_secs,
                &batch,
            )
            .await
        {
            Ok(outcomes) => Ok(self.settle(sink, &batch, outcomes)),
            Err(error) => {
                // Whether any of it was applied is unknown: every share stays in flight as it is,
                // and nobody waits on it meanwhile.
                let mut state = self.lock();
                for sent in &batch {
                    if let Some(share) = state
                        .consumers
                        .get_mut(&*sent.username)
                        .and_then(|c| c.in_flight.as_mut())
                    {
                        share.waiters.clear();
                    }
                }
                state.release_waiters();
                Err(error)
            }
        }
    }

    /// The shares to send now: those in flight again, and a new one for each queued consumer that
    /// has none in flight (it waits for that one first: a consumer's shares apply in order).
    fn form_batch(&self) -> Vec<ConsumerBatch> {
        let today = self.now().date;
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.newest_date.is_none_or(|d| d < today) {
            state.newest_date = Some(today);
            // A new day: forget consumers with nothing buffered and what was shown on older days.
            state.consumers.retain(|_, c| {
                if c.shown.as_ref().is_some_and(|s| s.date < today) {
                    c.shown = None;
                }
                c.confirmed.retain(|(k, _)| k.date >= today);
                !(c.is_idle() && c.shown.is_none())
            });
        }
        let mut batch = Vec::new();
        for name in &state.flying {
            if let Some(share) = state
                .consumers
                .get(&**name)
                .and_then(|c| c.in_flight.as_ref())
            {
                batch.push(share.to_batch(name));
            }
        }
        let seq = state.next_seq;
        let mut formed = false;
        let spare = std::mem::take(&mut state.spare_queue);
        let mut queue = std::mem::replace(&mut state.queue, spare);
        for name in queue.drain(..) {
            let Some(c) = state.consumers.get_mut(&*name) else {
                continue;
            };
            if c.in_flight.is_some() {
                state.queue.push(name);
                continue;
            }
            c.queued = false;
            if c.pending.is_empty() {
                continue;
            }
            let share = Share {
                seq,
                counts: c.pending.drain().collect(),
                waiters: std::mem::take(&mut c.waiters),
            };
            batch.push(share.to_batch(&name));
            c.in_flight = Some(share);
            state.flying.push(name);
            formed = true;
        }
        state.spare_queue = queue;
        if formed {
            state.next_seq += 1;
        }
        self.pending_gauge.set(state.unconfirmed as f64);
        batch
    }

    /// Takes in what Redis did with each share. Returns whether any was confirmed.
    fn settle(&self, sink: &Sink, batch: &[ConsumerBatch], outcomes: Vec<ShareOutcome>) -> bool {
        let mut confirmed = false;
        let mut refused = Vec::new();
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            for (sent, outcome) in batch.iter().zip(outcomes) {
                let Some(c) = state.consumers.get_mut(&*sent.username) else {
                    continue;
                };
                let Some(share) = c.in_flight.take_if(|s| s.seq == sent.seq) else {
                    continue;
                };
                match outcome {
                    ShareOutcome::Applied => {
                        state.keys = state.keys.saturating_sub(share.counts.len());
                        state.unconfirmed = state.unconfirmed.saturating_sub(share.increments());
                        for (key, day) in &share.counts {
                            match c.confirmed.iter_mut().find(|(k, _)| k == key) {
                                Some((_, sum)) => add_day(sum, day),
                                None => c.confirmed.push((key.clone(), *day)),
                            }
                        }
                        if let Some(shown) = &mut c.shown
                            && share.seq > shown.base_seq
                        {
                            for (key, day) in &share.counts {
                                if key.date == shown.date {
                                    add_one(&mut shown.since, &key.entry, day);
                                }
                            }
                        }
                        for waiter in share.waiters {
                            let _ = waiter.send(());
                        }
                        confirmed = true;
                    }
                    ShareOutcome::Refused { key, reason } => {
                        // Nothing was written: the counts go back to pending and are sent again,
                        // under a new sequence, until the key is repaired.
                        for (counter, day) in share.counts {
                            match c.pending.get_mut(&counter) {
                                Some(sum) => {
                                    add_day(sum, &day);
                                    state.keys = state.keys.saturating_sub(1);
                                }
                                None => {
                                    c.pending.insert(counter, day);
                                }
                            }
                        }
                        if !c.queued {
                            c.queued = true;
                            state.queue.push(sent.username.clone());
                        }
                        refused.push((Some(key), reason, sent.username.clone()));
                    }
                    ShareOutcome::Failed(error) => {
                        // Unknown whether Redis wrote any of it: retried as it is.
                        c.in_flight = Some(Share {
                            waiters: Vec::new(),
                            ..share
                        });
                        refused.push((None, error, sent.username.clone()));
                    }
                }
            }
            state.flying.retain(|name| {
                state
                    .consumers
                    .get(&**name)
                    .is_some_and(|c| c.in_flight.is_some())
            });
            self.pending_gauge.set(state.unconfirmed as f64);
        }
        for (key, reason, consumer) in refused {
            self.rejected.increment(1);
            match key {
                Some(key) if should_log(&sink.logged, &key) => tracing::error!(
                    %key,
                    %consumer,
                    %reason,
                    "redis refused a TDL write; the consumer's counts stay in memory and are written once the key is repaired (other consumers are not held up)"
                ),
                None if should_log(&sink.logged, &consumer) => tracing::error!(
                    %consumer,
                    error = %reason,
                    "redis failed a TDL write; retrying it unchanged (other consumers are not held up)"
                ),
                _ => {}
            }
        }
        confirmed
    }

    /// Runs the flusher until `stop` fires. Call once, inside the runtime.
    pub async fn run_flusher(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(sink) = &self.sink else { return };
        loop {
            tokio::select! {
                () = tokio::time::sleep(sink.flush_interval) => {}
                () = sink.wake.notified(), if sink.mode == TdlMode::Sync => {}
                _ = stop.changed() => return,
            }
            // Sync mode drains everything waiting; async writes one batch per interval.
            loop {
                match self.flush_once().await {
                    Ok(true) if sink.mode == TdlMode::Sync => {}
                    Ok(_) | Err(StoreError::Unavailable(_)) => break,
                    // An outage is said by the health latch; anything else is said here.
                    Err(error) => {
                        if should_log(&sink.logged, "flush") {
                            tracing::error!(%error, "TDL counters could not be written; retrying");
                        }
                        break;
                    }
                }
            }
        }
    }

    /// The final flush at shutdown: keeps trying until everything is written or `limit` passes;
    /// whatever is left is counted as dropped. Returns the number dropped.
    pub async fn final_flush(&self, limit: Duration) -> u64 {
        let Some(sink) = &self.sink else { return 0 };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let empty = self.lock().unconfirmed == 0;
            if empty || tokio::time::Instant::now() >= deadline {
                break;
            }
            if !sink.store.is_up() {
                let _ = tokio::time::timeout_at(deadline, sink.store.ping()).await;
            }
            match tokio::time::timeout_at(deadline, self.flush_once()).await {
                Err(_) => break,
                Ok(Ok(true)) => {}
                // Nothing confirmed (Redis down, or a share refused): a moment before trying again.
                Ok(_) => {
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                    )
                    .await;
                }
            }
        }
        let left = self.lock().unconfirmed;
        if left > 0 {
            self.dropped.increment(left);
            tracing::error!(
                increments = left,
                "TDL increments could not be written to Redis before exit"
            );
        }
        left
    }
}

/// Embedded mode: removes one date's counters. Returns how many there were.
fn remove_day(state: &mut State, date: Date) -> usize {
    let Some(counters) = state.by_date.remove(&date) else {
        return 0;
    };
    let mut removed = 0;
    for (consumer, entry) in counters {
        if let Some(c) = state.consumers.get_mut(&*consumer) {
            let key = EntryDayRef {
                entry: &entry,
                date,
            };
            if c.pending.remove(&key).is_some() {
                removed += 1;
            }
            if c.is_idle() {
                state.consumers.remove(&*consumer);
            }
        }
    }
    state.keys = state.keys.saturating_sub(removed);
    removed
}

/// Whether a message about `key` is due (at most one a minute per key).
fn should_log(logged: &Mutex<HashMap<String, Instant>>, key: &str) -> bool {
    let now = Instant::now();
    let mut logged = logged.lock().unwrap_or_else(|e| e.into_inner());
    if logged.len() >= 1024 {
        logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
    }
    match logged.get(key) {
        Some(at) if now.duration_since(*at) < LOG_EVERY => false,
        _ => {
            logged.insert(key.to_owned(), now);
            true
        }
    }
}

fn add_day(sum: &mut DayUsage, day: &DayUsage) {
    for (s, n) in sum.iter_mut().zip(day) {
        *s = s.saturating_add(*n);
    }
}

fn add_one(total: &mut Vec<(Arc<str>, DayUsage)>, id: &Arc<str>, day: &DayUsage) {
    match total.iter_mut().find(|(t, _)| t == id) {
        Some((_, sum)) => add_day(sum, day),
        None => total.push((id.clone(), *day)),
    }
}

fn add_all<'a>(
    total: &mut Vec<(String, DayUsage)>,
    more: impl Iterator<Item = (&'a str, &'a DayUsage)>,
) {
    for (id, day) in more {
        match total.iter_mut().find(|(t, _)| t == id) {
            Some((_, sum)) => add_day(sum, day),
            None => total.push((id.to_owned(), *day)),
        }
    }
}

fn add_counts(
    total: &mut Vec<(String, DayUsage)>,
    counts: &HashMap<EntryDay, DayUsage>,
    date: Date,
) {
    add_all(
        total,
        counts
            .iter()
            .filter(|(k, _)| k.date == date)
            .map(|(k, day)| (&*k.entry, day)),
    );
}

/// The counts of one date, as (entry id, counts).
fn dated<'a>(
    counts: impl Iterator<Item = &'a (EntryDay, DayUsage)>,
    date: Date,
) -> impl Iterator<Item = (&'a str, &'a DayUsage)> {
    counts
        .filter(move |(k, _)| k.date == date)
        .map(|(k, day)| (&*k.entry, day))
}

/// One date's counts, copied out from under the lock.
fn day_counts<'a>(
    counts: impl Iterator<Item = (&'a EntryDay, &'a DayUsage)>,
    date: Date,
) -> Vec<(Arc<str>, DayUsage)> {
    counts
        .filter(|(k, _)| k.date == date)
        .map(|(k, day)| (k.entry.clone(), *day))
        .collect()
}

/// A random id for this process: shares of different replicas and restarts never collide.
fn instance_id() -> String {
    let bytes: [u8; 8] = rand::random();
    hex::encode(bytes)
}

/// Calls of one (entry, local date) of a consumer that this process holds, for the billing export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCalls {
    pub entry: Arc<str>,
    pub date: Date,
    pub calls: u64,
    /// Redis mode: the sequence of the share in flight that carries these calls (Redis has them
    /// once this process's ledger reaches it); `None` for calls not sent yet, or embedded mode.
    pub in_flight: Option<u64>,
}

/// What the billing export (`crate::admin::export`) reads of the counters in memory.
impl TdlCounters {
    /// Redis mode: this process's instance id, which names its ledger keys; `None` embedded.
    pub fn instance(&self) -> Option<&str> {
        self.sink.as_ref().map(|s| s.instance.as_str())
    }

    /// Redis mode: while the guard lives, the flusher neither forms nor settles a share, so Redis's
    /// counts and [`TdlCounters::held`] describe one moment (as `/api/tdl-matrix` reads them).
    /// `None` in embedded mode, where memory is the only store.
    pub async fn hold_flushes(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        match &self.sink {
            Some(sink) => Some(sink.gate.read().await),
            None => None,
        }
    }

    /// The consumers with calls held here on a date in `from..=to`: embedded mode every count,
    /// Redis mode those Redis has not confirmed. Embedded mode takes the lock once per date, so
    /// `/auth` never waits behind a whole month.
    pub fn held_consumers(&self, from: Date, to: Date) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = Vec::new();
        if self.sink.is_some() {
            let state = self.lock();
            for (name, c) in &state.consumers {
                let in_range = |k: &EntryDay| (from..=to).contains(&k.date);
                let flying = c
                    .in_flight
                    .as_ref()
                    .is_some_and(|s| s.counts.iter().any(|(k, _)| in_range(k)));
                if flying || c.pending.keys().any(in_range) {
                    names.push(name.clone());
                }
            }
        } else {
            let mut day = from;
            while day <= to {
                let state = self.lock();
                if let Some(counters) = state.by_date.get(&day) {
                    names.extend(counters.iter().map(|(consumer, _)| consumer.clone()));
                }
                drop(state);
                match day.tomorrow() {
                    Ok(next) => day = next,
                    Err(_) => break,
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The calls of `consumer` on dates in `from..=to` held here (see [`TdlCounters::held_consumers`]),
    /// one item per (entry, date) and share.
    pub fn held(&self, consumer: &str, from: Date, to: Date) -> Vec<HeldCalls> {
        let state = self.lock();
        let Some(c) = state.consumers.get(consumer) else {
            return Vec::new();
        };
        // This process's counts not yet sent, then the share in flight (under its sequence).
        let pending = c.pending.iter().map(|(k, day)| (k, day, None));
        let flying = c.in_flight.iter().flat_map(|share| {
            share
                .counts
                .iter()
                .map(move |(k, day)| (k, day, Some(share.seq)))
        });
        pending
            .chain(flying)
            .filter(|(k, _, _)| (from..=to).contains(&k.date))
            .map(|(k, day, in_flight)| HeldCalls {
                entry: k.entry.clone(),
                date: k.date,
                calls: day.iter().sum(),
                in_flight,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn day(s: &str) -> Date {
        s.parse().unwrap()
    }

    fn settings(retention_days: u32, max_keys: usize) -> TdlSettings {
        TdlSettings {
            retention_days,
            max_pending_keys: max_keys,
            max_history_keys: max_keys,
            ..TdlSettings::default()
        }
    }

    fn embedded(zone: TimeZone, clock: Arc<ManualClock>, retention_days: u32) -> TdlCounters {
        TdlCounters::new(zone, clock, &settings(retention_days, 1000), None)
    }

    /// Counters whose metrics go to a recorder of the test's own (the global one is shared by
    /// every test in the process).
    fn with_metrics(make: impl FnOnce() -> TdlCounters) -> (TdlCounters, PrometheusHandle) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counters = metrics::with_local_recorder(&recorder, make);
        (counters, handle)
    }

    fn metric(handle: &PrometheusHandle, name: &str) -> f64 {
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn usage(counters: &TdlCounters, consumer: &str, date: Date) -> Vec<(String, DayUsage)> {
        let usage = counters.usage(consumer, date, &[]).await;
        assert!(usage.complete, "embedded counts are complete");
        usage.entries
    }

    fn ids(used: &[(String, DayUsage)]) -> Vec<&str> {
        used.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// A store that never connects: Redis mode with Redis down.
    fn unreachable_store() -> Arc<RedisStore> {
        let settings = crate::config::RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            ..crate::config::RedisSettings::default()
        };
        Arc::new(RedisStore::new(&settings).unwrap())
    }

    #[test]
    fn slots_in_utc() {
        let utc = TimeZone::UTC;
        assert_eq!(SlotStamp::at(ts("2026-11-27T00:00:00Z"), &utc).slot, 1);
        assert_eq!(SlotStamp::at(ts("2026-11-27T01:59:59Z"), &utc).slot, 1);
        assert_eq!(SlotStamp::at(ts("2026-11-27T02:00:00Z"), &utc).slot, 2);
        assert_eq!(SlotStamp::at(ts("2026-11-27T23:59:59Z"), &utc).slot, 12);
    }

    #[test]
    fn seoul_is_nine_hours_ahead() {
        let seoul = TimeZone::get("Asia/Seoul").unwrap();
        // 15:30 UTC is 00:30 the next day in Seoul: T1 of the 28th.
        let stamp = SlotStamp::at(ts("2026-11-27T15:30:00Z"), &seoul);
        assert_eq!(stamp.date, jiff::civil::date(2026, 11, 28));
        assert_eq!(stamp.slot_name(), "T1");
        let stamp = SlotStamp::at(ts("2026-11-27T14:59:59Z"), &seoul);
        assert_eq!(
            (stamp.date, stamp.slot),
            (jiff::civil::date(2026, 11, 27), 12)
        );
    }

    #[tokio::test]
    async fn counts_per_slot_and_day_rollover() {
        let seoul = TimeZone::get("Asia/Seoul").unwrap();
        let clock = Arc::new(ManualClock::new(ts("2026-11-27T14:30:00Z")));
        let counters = embedded(seoul, clock.clone(), 35);
        let (c, e): (Arc<str>, Arc<str>) = ("user1".into(), "kt".into());
        counters.record(&c, &e);
        counters.record(&c, &e);
        clock.set(ts("2026-11-27T15:00:00Z")); // local midnight
        counters.record(&c, &e);
        let day1 = usage(&counters, "user1", jiff::civil::date(2026, 11, 27)).await;
        assert_eq!(day1[0].1[11], 2);
        let day2 = usage(&counters, "user1", jiff::civil::date(2026, 11, 28)).await;
        assert_eq!(day2[0].1[0], 1);
        assert_eq!(day2[0].1.iter().sum::<u64>(), 1);
        assert!(
            usage(&counters, "other", jiff::civil::date(2026, 11, 28))
                .await
                .is_empty()
        );
        let known = counters
            .usage("other", jiff::civil::date(2026, 11, 28), &["x"])
            .await;
        assert_eq!(known.entries, vec![("x".to_owned(), [0; SLOTS])]);
    }

    #[tokio::test]
    async fn old_days_are_pruned() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = embedded(TimeZone::UTC, clock.clone(), 2);
        let (c, e): (Arc<str>, Arc<str>) = ("u".into(), "e".into());
        counters.record(&c, &e);
        clock.set(ts("2026-11-02T10:00:00Z"));
        counters.record(&c, &e);
        assert_eq!(usage(&counters, "u", day("2026-11-01")).await.len(), 1);
        clock.set(ts("2026-11-03T10:00:00Z"));
        counters.record(&c, &e);
        assert!(usage(&counters, "u", day("2026-11-01")).await.is_empty());
        assert_eq!(usage(&counters, "u", day("2026-11-02")).await.len(), 1);
        assert_eq!(counters.lock().keys, 2, "the pruned day no longer counts");
    }

    #[tokio::test]
    async fn a_full_history_makes_room_for_today_by_evicting_the_oldest_days() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let (counters, metrics) =
            with_metrics(|| TdlCounters::new(TimeZone::UTC, clock.clone(), &settings(35, 3), None));
        let c: Arc<str> = "u".into();
        for entry in ["a", "b"] {
            counters.record(&c, &entry.into());
        }
        clock.set(ts("2026-11-02T10:00:00Z"));
        counters.record(&c, &"c".into());
        // The bound is reached by history: today's new counters evict the oldest day, not drop.
        clock.set(ts("2026-11-03T10:00:00Z"));
        for entry in ["d", "e", "d"] {
            counters.record(&c, &entry.into());
        }
        let today = usage(&counters, "u", day("2026-11-03")).await;
        let mut today_ids = ids(&today);
        today_ids.sort_unstable();
        assert_eq!(today_ids, ["d", "e"]);
        assert_eq!(
            today
                .iter()
                .map(|(_, d)| d.iter().sum::<u64>())
                .sum::<u64>(),
            3
        );
        assert!(
            usage(&counters, "u", day("2026-11-01")).await.is_empty(),
            "oldest day evicted first"
        );
        assert_eq!(ids(&usage(&counters, "u", day("2026-11-02")).await), ["c"]);
        assert_eq!(metric(&metrics, "uma_tdl_evicted_total"), 2.0);
        assert_eq!(metric(&metrics, "uma_tdl_dropped_total"), 0.0);
        // Only when today alone fills the bound is a new counter dropped (and counted).
        counters.record(&c, &"f".into());
        counters.record(&c, &"g".into());
        let today = usage(&counters, "u", day("2026-11-03")).await;
        assert_eq!(today.len(), 3, "{:?}", ids(&today));
        assert!(usage(&counters, "u", day("2026-11-02")).await.is_empty());
        assert_eq!(metric(&metrics, "uma_tdl_dropped_total"), 1.0);
        assert_eq!(counters.lock().keys, 3);
    }

    #[tokio::test]
    async fn a_huge_retention_never_panics() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = embedded(TimeZone::UTC, clock.clone(), u32::MAX);
        let (c, e): (Arc<str>, Arc<str>) = ("u".into(), "e".into());
        counters.record(&c, &e);
        clock.set(ts("2026-11-02T10:00:00Z"));
        counters.record(&c, &e);
        assert_eq!(usage(&counters, "u", day("2026-11-01")).await.len(), 1);
        assert_eq!(usage(&counters, "u", day("2026-11-02")).await.len(), 1);
    }

    #[tokio::test]
    async fn redis_mode_buffers_up_to_max_pending_keys_and_answers_incomplete_while_down() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let (counters, metrics) = with_metrics(|| {
            let settings = TdlSettings {
                max_pending_keys: 2,
                max_history_keys: 1000,
                ..TdlSettings::default()
            };
            TdlCounters::new(TimeZone::UTC, clock, &settings, Some(unreachable_store()))
        });
        let (u, v): (Arc<str>, Arc<str>) = ("u".into(), "v".into());
        for (consumer, entry) in [(&u, "a"), (&u, "a"), (&v, "b"), (&u, "c")] {
            counters.record(consumer, &entry.into());
        }
        assert_eq!(metric(&metrics, "uma_tdl_dropped_total"), 1.0);
        let shown = counters.usage("u", day("2026-11-01"), &["a", "x"]).await;
        assert!(!shown.complete, "redis was not read");
        assert_eq!(ids(&shown.entries), ["a", "x"]);
        assert_eq!(shown.entries[0].1[5], 2);
        let state = counters.lock();
        assert_eq!((state.keys, state.unconfirmed), (2, 3));
        assert_eq!(state.queue.len(), 2, "each consumer queued once");
    }

    fn redis_mode(clock: Arc<ManualClock>) -> TdlCounters {
        TdlCounters::new(
            TimeZone::UTC,
            clock,
            &TdlSettings::default(),
            Some(unreachable_store()),
        )
    }

    fn sent(batch: &[ConsumerBatch]) -> Vec<(String, u64, u64)> {
        let mut sent: Vec<(String, u64, u64)> = batch
            .iter()
            .map(|b| {
                let n = b.counters.iter().flat_map(|c| c.slots).sum();
                (b.username.to_string(), b.seq, n)
            })
            .collect();
        sent.sort();
        sent
    }

    #[tokio::test]
    async fn each_consumer_share_settles_on_its_own() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = redis_mode(clock);
        let sink = counters.sink.as_ref().unwrap();
        let (u, v, w): (Arc<str>, Arc<str>, Arc<str>) = ("u".into(), "v".into(), "w".into());
        let e: Arc<str> = "e".into();
        for consumer in [&u, &u, &v, &w] {
            counters.record(consumer, &e);
        }
        let batch = counters.form_batch();
        assert_eq!(
            sent(&batch),
            [("u".into(), 1, 2), ("v".into(), 1, 1), ("w".into(), 1, 1)]
        );
        // More calls while the batch is out wait for their consumer's share.
        counters.record(&u, &e);
        counters.record(&v, &e);
        let outcome = |name: &str| match name {
            "u" => ShareOutcome::Applied,
            "v" => ShareOutcome::Refused {
                key: "uma:tdl:{v}:e:2026-11-01".into(),
                reason: "the counter is a string, not a hash".into(),
            },
            _ => ShareOutcome::Failed("OOM".into()),
        };
        let outcomes = batch.iter().map(|b| outcome(&b.username)).collect();
        assert!(counters.settle(sink, &batch, outcomes));
        {
            let state = counters.lock();
            assert_eq!(state.unconfirmed, 4, "u's newer call, v's 2 and w's 1");
            assert_eq!(state.keys, 3);
        }
        // u: a new share; v: its refused counts again, merged with the newer call, under a new
        // sequence; w: the failed share again, unchanged, under its old sequence.
        let batch = counters.form_batch();
        assert_eq!(
            sent(&batch),
            [("u".into(), 2, 1), ("v".into(), 2, 2), ("w".into(), 1, 1)]
        );
        let outcomes = batch.iter().map(|_| ShareOutcome::Applied).collect();
        assert!(counters.settle(sink, &batch, outcomes));
        let state = counters.lock();
        assert_eq!((state.unconfirmed, state.keys), (0, 0));
        assert!(state.queue.is_empty() && state.flying.is_empty());
        drop(state);
        assert!(counters.form_batch().is_empty());
    }

    async fn shown(counters: &TdlCounters) -> u64 {
        let usage = counters.usage("u", day("2026-11-01"), &["e"]).await;
        assert!(!usage.complete);
        usage.entries[0].1.iter().sum()
    }

    #[tokio::test]
    async fn without_any_read_an_incomplete_answer_counts_everything_this_process_counted() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = redis_mode(clock);
        let sink = counters.sink.as_ref().unwrap();
        let (u, e): (Arc<str>, Arc<str>) = ("u".into(), "e".into());
        for _ in 0..3 {
            counters.record(&u, &e);
        }
        let batch = counters.form_batch();
        assert_eq!(shown(&counters).await, 3, "in flight");
        counters.settle(sink, &batch, vec![ShareOutcome::Applied]);
        counters.record(&u, &e);
        assert_eq!(shown(&counters).await, 4, "confirmed plus pending");
        let batch = counters.form_batch();
        counters.settle(sink, &batch, vec![ShareOutcome::Failed("timeout".into())]);
        assert_eq!(shown(&counters).await, 4, "still in flight after a failure");
    }

    #[test]
    fn shares_carry_their_sequence_and_counters() {
        let share = Share {
            seq: 7,
            counts: vec![(
                EntryDay {
                    entry: "a".into(),
                    date: day("2026-11-01"),
                },
                [1; SLOTS],
            )],
            waiters: Vec::new(),
        };
        let batch = share.to_batch(&"u1".into());
        assert_eq!((&*batch.username, batch.seq), ("u1", 7));
        assert_eq!(batch.counters.len(), 1);
        assert_eq!(share.increments(), SLOTS as u64);
        assert_ne!(instance_id(), instance_id());
    }
}
