//! Usage sums and budgets (SPEC §9, §8.1): records posted to `/usage`, counted once per consumer
//! and request id, summed per slot, day and month, and the token and cost budgets `/auth` checks.
//!
//! **Embedded mode**: memory is the store, exact, with the same dedup rule (ids kept for
//! `usage.dedup_hours`).
//!
//! **Redis mode**: each post's records are written at once, one atomic script per consumer that
//! checks the seen-id set and adds to the sums (see `store::usage`); the answer then says which
//! were duplicates. While Redis cannot take them they wait here (bounded by
//! `usage.max_pending_records`, dropped past it and counted) under a batch id of this process, and
//! a retry under the same id is answered from Redis's ledger, so nothing is written twice.
//!
//! **Budgets** never cost `/auth` a round trip: each replica keeps a view of the totals of the
//! (consumer, entry) pairs it has been asked about, re-read from Redis every
//! `usage.budget_refresh_ms` in one pipeline, plus the records it wrote or holds itself since. A
//! record crossing a budget on one replica is therefore refused by all within that period plus a
//! round trip. Only the first call on a pair waits for its totals.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use metrics::{Counter, Gauge, counter, gauge};
use rustc_hash::FxBuildHasher;
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::config::{OnRedisDown, UsageSettings};
use crate::core::Refusal;
use crate::core::limits::Limits;
use crate::core::model::SLOTS;
use crate::core::quota::{BudgetWindows, Spent, Standing, budget_standings};
use crate::core::usage::Totals;
use crate::store::{
    BatchOutcome, RedisStore, StoreError, StoredDay, StoredRecord, StoredSpent, UsageBatch,
    UsageTtls,
};
use crate::tdl::SlotStamp;

type HashMap<K, V> = hashbrown::HashMap<K, V, FxBuildHasher>;

/// A view nobody asked about for this long is dropped (and no longer read).
const VIEW_IDLE: Duration = Duration::from_secs(120);
/// Pairs read in one pipeline.
const READ_CHUNK: usize = 512;
/// How often waiting records are offered to Redis.
const WRITE_INTERVAL: Duration = Duration::from_millis(100);
/// Batches written in one round trip by the writer.
const WRITE_CHUNK: usize = 64;
/// Month sums are kept 13 months after their last write (SPEC §9), whatever the retention says.
const MONTH_TTL_SECS: u64 = 13 * 31 * 86_400 + 31 * 86_400;

/// One record, checked and priced, ready to be counted.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub consumer: Arc<str>,
    pub entry: Arc<str>,
    pub request_id: String,
    pub time: Timestamp,
    pub totals: Totals,
}

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Accepted,
    Duplicate,
}

/// A consumer's sums for one date, for `/api/usage`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The known entries first, then any other entry with records that day.
    pub entries: Vec<(String, StoredDay)>,
    /// Whether Redis was read for this answer (always in embedded mode).
    pub complete: bool,
}

/// (consumer, entry).
type Pair = (Arc<str>, Arc<str>);

/// Reports last read from Redis, per consumer and date.
type ShownReports = HashMap<(Arc<str>, Date), Vec<(String, StoredDay)>>;

/// One day's sums of one (consumer, entry), in memory.
#[derive(Debug, Clone, Default)]
struct DaySums {
    slots: [Totals; SLOTS],
    day: Totals,
}

/// One entry's sums, by local date and by month (its first day).
#[derive(Default)]
struct EntrySums {
    days: BTreeMap<Date, DaySums>,
    months: BTreeMap<Date, Totals>,
}

/// Embedded mode's store; in Redis mode the records waiting for Redis. Keyed consumer → entry, so
/// a lookup borrows the names (cloning the `Arc`s on every `/auth` would bounce their counts
/// between cores) and one consumer's sums are found without looking at anyone else's.
#[derive(Default)]
struct Sums {
    by_consumer: HashMap<Arc<str>, HashMap<Arc<str>, EntrySums>>,
}

impl Sums {
    fn add(&mut self, record: &Prepared, stamp: SlotStamp) {
        let sums = self
            .by_consumer
            .entry(record.consumer.clone())
            .or_default()
            .entry(record.entry.clone())
            .or_default();
        let day = sums.days.entry(stamp.date).or_default();
        day.slots[usize::from(stamp.slot - 1)].add(&record.totals);
        day.day.add(&record.totals);
        sums.months
            .entry(stamp.date.first_of_month())
            .or_default()
            .add(&record.totals);
    }

    fn remove(&mut self, record: &Prepared, stamp: SlotStamp) {
        let Some(entries) = self.by_consumer.get_mut(&*record.consumer) else {
            return;
        };
        let Some(sums) = entries.get_mut(&*record.entry) else {
            return;
        };
        let sub = |t: &mut Totals| {
            t.input = t.input.saturating_sub(record.totals.input);
            t.output = t.output.saturating_sub(record.totals.output);
            t.cost = t.cost.saturating_sub(record.totals.cost);
        };
        if let Some(day) = sums.days.get_mut(&stamp.date) {
            sub(&mut day.slots[usize::from(stamp.slot - 1)]);
            sub(&mut day.day);
            if day.day == Totals::default() {
                sums.days.remove(&stamp.date);
            }
        }
        let month = stamp.date.first_of_month();
        if let Some(t) = sums.months.get_mut(&month) {
            sub(t);
            if *t == Totals::default() {
                sums.months.remove(&month);
            }
        }
        if sums.days.is_empty() && sums.months.is_empty() {
            entries.remove(&*record.entry);
            if entries.is_empty() {
                self.by_consumer.remove(&*record.consumer);
            }
        }
    }

    fn spent(&self, consumer: &str, entry: &str, date: Date) -> Spent {
        let Some(sums) = self.by_consumer.get(consumer).and_then(|e| e.get(entry)) else {
            return Spent::default();
        };
        let day = sums.days.get(&date).map(|d| d.day).unwrap_or_default();
        let month = sums
            .months
            .get(&date.first_of_month())
            .copied()
            .unwrap_or_default();
        Spent {
            tokens_day: day.input.saturating_add(day.output),
            cost_day: day.cost,
            cost_month: month.cost,
        }
    }

    /// Adds this store's sums of `consumer` on `date` to `report`, entries it lacks at the end.
    fn add_to(&self, consumer: &str, date: Date, report: &mut Vec<(String, StoredDay)>) {
        let Some(entries) = self.by_consumer.get(consumer) else {
            return;
        };
        let mut found: Vec<(&Arc<str>, &EntrySums)> = entries
            .iter()
            .filter(|(_, sums)| sums.days.contains_key(&date))
            .collect();
        found.sort_by(|a, b| a.0.cmp(b.0));
        for (entry, sums) in found {
            let Some(day) = sums.days.get(&date) else {
                continue;
            };
            let position = report.iter().position(|(id, _)| **id == **entry);
            let index = position.unwrap_or_else(|| {
                report.push((entry.to_string(), StoredDay::default()));
                report.len() - 1
            });
            let target = &mut report[index].1;
            for (slot, sum) in target.slots.iter_mut().zip(&day.slots) {
                slot.add(sum);
            }
            target.day.add(&day.day);
            if let Some(month) = sums.months.get(&date.first_of_month()) {
                target.month.add(month);
            }
        }
    }

    fn prune(&mut self, oldest_day: Date, oldest_month: Date) {
        for entries in self.by_consumer.values_mut() {
            for sums in entries.values_mut() {
                sums.days.retain(|d, _| *d >= oldest_day);
                sums.months.retain(|m, _| *m >= oldest_month);
            }
            entries.retain(|_, s| !(s.days.is_empty() && s.months.is_empty()));
        }
        self.by_consumer.retain(|_, e| !e.is_empty());
    }
}

/// The request ids one consumer recorded, oldest first, so forgetting is a pop from the front.
#[derive(Default)]
struct SeenIds {
    order: VecDeque<(i64, [u8; 16])>,
    set: HashSet<[u8; 16], FxBuildHasher>,
}

impl SeenIds {
    /// Whether `digest` is new (and now remembered until `keep_ms`).
    fn insert(&mut self, digest: [u8; 16], keep_ms: i64) -> bool {
        if !self.set.insert(digest) {
            return false;
        }
        self.order.push_back((keep_ms, digest));
        true
    }

    fn forget_before(&mut self, cutoff_ms: i64) {
        while let Some((at, digest)) = self.order.front().copied() {
            if at >= cutoff_ms {
                break;
            }
            self.order.pop_front();
            self.set.remove(&digest);
        }
    }
}

/// What this replica knows of one pair's budget totals.
struct View {
    /// The date the Redis read was for (its month too), and what it said.
    read_date: Option<Date>,
    read: StoredSpent,
    /// When the last read was sent; records confirmed before it are in `read`.
    read_sent: Option<Instant>,
    /// This replica's records confirmed since (when, date, totals): added until a read sent after
    /// them comes back.
    confirmed: Vec<(Instant, Date, Totals)>,
    /// Asked about since the last refresh (a flag, not a time: `/auth` reads no clock for it).
    used: bool,
    /// Since when nobody has asked (set by the refresh).
    idle_since: Option<Instant>,
}

impl View {
    fn new() -> View {
        View {
            read_date: None,
            read: StoredSpent::default(),
            read_sent: None,
            confirmed: Vec::new(),
            used: true,
            idle_since: None,
        }
    }

    fn spent(&self, today: Date) -> Spent {
        let mut spent = Spent::default();
        if let Some(date) = self.read_date {
            if date == today {
                spent.tokens_day = self.read.tokens_day;
                spent.cost_day = self.read.cost_day;
            }
            if date.first_of_month() == today.first_of_month() {
                spent.cost_month = self.read.cost_month;
            }
        }
        for (_, date, totals) in &self.confirmed {
            add_spent(&mut spent, *date, totals, today);
        }
        spent
    }
}

fn add_spent(spent: &mut Spent, date: Date, totals: &Totals, today: Date) {
    if date == today {
        spent.tokens_day = spent
            .tokens_day
            .saturating_add(totals.input.saturating_add(totals.output));
        spent.cost_day = spent.cost_day.saturating_add(totals.cost);
    }
    if date.first_of_month() == today.first_of_month() {
        spent.cost_month = spent.cost_month.saturating_add(totals.cost);
    }
}

/// Records waiting for Redis, in one consumer's batch.
struct Waiting {
    batch: UsageBatch,
    records: Vec<(Prepared, SlotStamp)>,
}

#[derive(Default)]
struct State {
    /// Embedded mode: all sums. Redis mode: the sums of the records waiting for Redis.
    sums: Sums,
    /// Embedded mode: every consumer's ids. Redis mode: the ids of the waiting records.
    seen: HashMap<Arc<str>, SeenIds>,
    waiting: VecDeque<Waiting>,
    waiting_records: usize,
    next_seq: u64,
    /// Budget views, consumer → entry.
    views: HashMap<Arc<str>, HashMap<Arc<str>, View>>,
    /// The last report read from Redis per consumer and date, for answers while it is down.
    shown: ShownReports,
    newest_date: Option<Date>,
    /// The budget windows of the current day.
    windows: Option<BudgetWindows>,
}

impl State {
    fn view_mut(&mut self, consumer: &str, entry: &str) -> Option<&mut View> {
        self.views.get_mut(consumer)?.get_mut(entry)
    }

    /// The budget windows at `now`, computed once a day.
    fn windows_at(&mut self, now: Timestamp, zone: &TimeZone) -> BudgetWindows {
        match self.windows {
            Some(w) if w.hold(now) => w,
            _ => *self.windows.insert(BudgetWindows::at(now, zone)),
        }
    }

    /// What (consumer, entry) spent on `today` as far as this replica knows without asking
    /// Redis: everything in `embedded` mode, else its view plus the records waiting here; `None`
    /// when Redis mode has no view of the pair yet.
    fn known_spent(
        &mut self,
        consumer: &str,
        entry: &str,
        today: Date,
        embedded: bool,
    ) -> Option<Spent> {
        let waiting = self.sums.spent(consumer, entry, today);
        if embedded {
            return Some(waiting);
        }
        let view = self.view_mut(consumer, entry)?;
        view.used = true;
        Some(merge(view.spent(today), waiting))
    }
}

struct Shared {
    store: Arc<RedisStore>,
    /// This process, in batch ids.
    instance: String,
    on_redis_down: OnRedisDown,
}

struct UsageMetrics {
    accepted: Counter,
    duplicates: Counter,
    rejected: Counter,
    input_tokens: Counter,
    output_tokens: Counter,
    dropped: Counter,
    waiting: Gauge,
}

/// The usage records and budgets of one service process.
pub struct UsageBook {
    zone: TimeZone,
    clock: Arc<dyn Clock>,
    dedup: SignedDuration,
    retention_days: u32,
    refresh: Duration,
    max_waiting: usize,
    shared: Option<Shared>,
    state: Mutex<State>,
    /// Held shared while waiting records are written, exclusively while a report is read: a report
    /// adds the waiting records to what Redis has, so it must not see them in both places.
    gate: tokio::sync::RwLock<()>,
    metrics: UsageMetrics,
}

impl UsageBook {
    pub fn new(
        settings: &UsageSettings,
        retention_days: u32,
        zone: TimeZone,
        clock: Arc<dyn Clock>,
        store: Option<Arc<RedisStore>>,
        on_redis_down: OnRedisDown,
    ) -> UsageBook {
        let hours = i64::try_from(settings.dedup_hours).unwrap_or(168);
        UsageBook {
            zone,
            clock,
            dedup: SignedDuration::from_hours(hours),
            retention_days,
            refresh: Duration::from_millis(settings.budget_refresh_ms),
            max_waiting: usize::try_from(settings.max_pending_records).unwrap_or(usize::MAX),
            shared: store.map(|store| Shared {
                store,
                instance: hex::encode(rand::random::<[u8; 8]>()),
                on_redis_down,
            }),
            state: Mutex::new(State::default()),
            gate: tokio::sync::RwLock::new(()),
            metrics: UsageMetrics {
                accepted: counter!("uma_usage_records_total", "result" => "accepted"),
                duplicates: counter!("uma_usage_records_total", "result" => "duplicate"),
                rejected: counter!("uma_usage_records_total", "result" => "rejected"),
                input_tokens: counter!("uma_usage_tokens_total", "direction" => "input"),
                output_tokens: counter!("uma_usage_tokens_total", "direction" => "output"),
                dropped: counter!("uma_usage_dropped_total"),
                waiting: gauge!("uma_usage_pending_records"),
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn zone(&self) -> &TimeZone {
        &self.zone
    }

    pub fn dedup(&self) -> SignedDuration {
        self.dedup
    }

    pub fn count_rejected(&self, n: usize) {
        self.metrics.rejected.increment(n as u64);
    }

    /// Counts `records` (each once per consumer and request id); the outcome of each, in order.
    pub async fn record(&self, records: Vec<Prepared>) -> Vec<Counted> {
        let now = self.clock.now();
        let outcomes = match &self.shared {
            None => self.record_in_memory(&records, now),
            Some(shared) => self.record_in_redis(shared, &records, now).await,
        };
        for (record, outcome) in records.iter().zip(&outcomes) {
            match outcome {
                Counted::Accepted => {
                    self.metrics.accepted.increment(1);
                    self.metrics.input_tokens.increment(record.totals.input);
                    self.metrics.output_tokens.increment(record.totals.output);
                    crate::metrics::count_usage_cost(record.totals.cost);
                }
                Counted::Duplicate => self.metrics.duplicates.increment(1),
            }
        }
        outcomes
    }

    fn record_in_memory(&self, records: &[Prepared], now: Timestamp) -> Vec<Counted> {
        let mut state = self.lock();
        self.roll_day(&mut state, now);
        let cutoff = (now - self.dedup).as_millisecond();
        records
            .iter()
            .map(|record| {
                let seen = state.seen.entry(record.consumer.clone()).or_default();
                seen.forget_before(cutoff);
                if !seen.insert(digest(&record.request_id), keep_ms(record, now)) {
                    return Counted::Duplicate;
                }
                let stamp = SlotStamp::at(record.time, &self.zone);
                state.sums.add(record, stamp);
                Counted::Accepted
            })
            .collect()
    }

    async fn record_in_redis(
        &self,
        shared: &Shared,
        records: &[Prepared],
        now: Timestamp,
    ) -> Vec<Counted> {
        let mut outcomes = vec![Counted::Accepted; records.len()];
        let batches = self.batches(shared, records, now);
        if shared.store.is_up() {
            let sent: Vec<UsageBatch> = batches.iter().map(|(b, _)| b.clone()).collect();
            if let Ok(results) = shared
                .store
                .apply_usage(&sent, now.as_millisecond(), self.ttls())
                .await
            {
                let mut left = Vec::new();
                for ((batch, indexes), result) in batches.into_iter().zip(results) {
                    match result {
                        BatchOutcome::Applied(flags) => {
                            for (i, applied) in indexes.iter().zip(flags) {
                                if applied {
                                    self.confirmed(&records[*i]);
                                } else {
                                    outcomes[*i] = Counted::Duplicate;
                                }
                            }
                        }
                        other => {
                            log_unapplied(&batch.username, &other);
                            left.push((batch, indexes));
                        }
                    }
                }
                self.wait_for_redis(left, records, &mut outcomes, true);
                return outcomes;
            }
            // Sent, with no answer: Redis may have applied them, so they wait exactly as sent.
            self.wait_for_redis(batches, records, &mut outcomes, true);
            return outcomes;
        }
        self.wait_for_redis(batches, records, &mut outcomes, false);
        outcomes
    }

    /// One batch per consumer, under a new batch id each, with the records' positions.
    fn batches(
        &self,
        shared: &Shared,
        records: &[Prepared],
        now: Timestamp,
    ) -> Vec<(UsageBatch, Vec<usize>)> {
        let mut by_consumer: Vec<(UsageBatch, Vec<usize>)> = Vec::new();
        let mut state = self.lock();
        for (i, record) in records.iter().enumerate() {
            let stamp = SlotStamp::at(record.time, &self.zone);
            let stored = StoredRecord {
                digest: digest(&record.request_id),
                entry: record.entry.to_string(),
                date: stamp.date,
                slot: stamp.slot,
                seen_at_ms: keep_ms(record, now),
                totals: record.totals,
            };
            match by_consumer
                .iter_mut()
                .find(|(b, _)| *b.username == *record.consumer)
            {
                Some((batch, indexes)) => {
                    batch.records.push(stored);
                    indexes.push(i);
                }
                None => {
                    state.next_seq += 1;
                    let batch = UsageBatch {
                        username: record.consumer.to_string(),
                        batch_id: format!("{}:{}", shared.instance, state.next_seq),
                        records: vec![stored],
                    };
                    by_consumer.push((batch, vec![i]));
                }
            }
        }
        by_consumer
    }

    fn ttls(&self) -> UsageTtls {
        UsageTtls {
            dedup_ms: self.dedup.as_millis() as i64,
            day_secs: u64::from(self.retention_days) * 86_400,
            month_secs: MONTH_TTL_SECS,
            // A batch retried after a timeout must find its first answer for as long as it may
            // wait here, and its ids are kept that long anyway.
            ledger_secs: self.dedup.as_secs().unsigned_abs() + 86_400,
        }
    }

    /// Keeps batches Redis could not take, to be written by [`UsageBook::run_writer`]; past the
    /// bound records are dropped. A batch never `sent` loses the records already waiting under
    /// the same id (duplicates); one that was sent stays exactly as it was, so that its retry
    /// under the same batch id matches what Redis may already have applied.
    fn wait_for_redis(
        &self,
        batches: Vec<(UsageBatch, Vec<usize>)>,
        records: &[Prepared],
        outcomes: &mut [Counted],
        sent: bool,
    ) {
        if batches.is_empty() {
            return;
        }
        let mut state = self.lock();
        let mut dropped = 0u64;
        for (mut batch, indexes) in batches {
            let mut kept = Vec::new();
            let mut kept_stored = Vec::new();
            for (stored, i) in batch.records.drain(..).zip(indexes) {
                let record = &records[i];
                let seen = state.seen.entry(record.consumer.clone()).or_default();
                if !seen.insert(stored.digest, i64::MAX) && !sent {
                    outcomes[i] = Counted::Duplicate;
                    continue;
                }
                if state.waiting_records >= self.max_waiting {
                    dropped += 1;
                    continue;
                }
                state.waiting_records += 1;
                let stamp = SlotStamp {
                    date: stored.date,
                    slot: stored.slot,
                };
                state.sums.add(record, stamp);
                kept.push((record.clone(), stamp));
                kept_stored.push(stored);
            }
            if kept.is_empty() {
                continue;
            }
            batch.records = kept_stored;
            state.waiting.push_back(Waiting {
                batch,
                records: kept,
            });
        }
        self.metrics.waiting.set(state.waiting_records as f64);
        if dropped > 0 {
            self.metrics.dropped.increment(dropped);
            tracing::error!(
                dropped,
                "usage records dropped: usage.max_pending_records are already waiting for Redis"
            );
        }
    }

    /// A record Redis has now: budgets count it until a read sent after this comes back.
    fn confirmed(&self, record: &Prepared) {
        let stamp = SlotStamp::at(record.time, &self.zone);
        let mut state = self.lock();
        if let Some(view) = state.view_mut(&record.consumer, &record.entry) {
            view.confirmed
                .push((Instant::now(), stamp.date, record.totals));
        }
    }

    /// Writes the records that waited for Redis, oldest first; each batch under its first id.
    async fn write_waiting(&self, shared: &Shared) -> Result<(), StoreError> {
        loop {
            let _gate = self.gate.read().await;
            let batches: Vec<UsageBatch> = {
                let state = self.lock();
                state
                    .waiting
                    .iter()
                    .take(WRITE_CHUNK)
                    .map(|w| w.batch.clone())
                    .collect()
            };
            if batches.is_empty() {
                return Ok(());
            }
            let results = shared
                .store
                .apply_usage(&batches, self.clock.now().as_millisecond(), self.ttls())
                .await?;
            let mut state = self.lock();
            let mut settled = 0;
            for (sent, result) in batches.iter().zip(results) {
                let Some(position) = state
                    .waiting
                    .iter()
                    .position(|w| w.batch.batch_id == sent.batch_id)
                else {
                    continue;
                };
                let flags = match result {
                    BatchOutcome::Applied(flags) => flags,
                    other => {
                        log_unapplied(&sent.username, &other);
                        continue;
                    }
                };
                let Some(waiting) = state.waiting.remove(position) else {
                    continue;
                };
                settled += 1;
                state.waiting_records = state.waiting_records.saturating_sub(waiting.records.len());
                let now = Instant::now();
                for ((record, stamp), applied) in waiting.records.iter().zip(flags) {
                    state.sums.remove(record, *stamp);
                    if let Some(seen) = state.seen.get_mut(&record.consumer) {
                        seen.set.remove(&digest(&record.request_id));
                    }
                    if applied && let Some(view) = state.view_mut(&record.consumer, &record.entry) {
                        view.confirmed.push((now, stamp.date, record.totals));
                    }
                }
            }
            state.seen.retain(|_, s| {
                s.order.retain(|(_, d)| s.set.contains(d));
                !s.set.is_empty()
            });
            self.metrics.waiting.set(state.waiting_records as f64);
            if settled == 0 {
                // Every batch was refused (a key of the wrong type): try again later.
                return Ok(());
            }
        }
    }

    /// The token and cost budgets of `limits` for (consumer, entry) now, from this replica's view:
    /// `Err` is 503 while Redis is down and `limits.on_redis_down = "deny"`.
    pub async fn budgets(
        &self,
        consumer: &Arc<str>,
        entry: &Arc<str>,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<Vec<Standing>, Refusal> {
        let mut refusing = true;
        if let Some(shared) = &self.shared
            && !shared.store.is_up()
        {
            match shared.on_redis_down {
                OnRedisDown::Deny => return Err(Refusal::Unavailable),
                OnRedisDown::Allow => refusing = false,
                OnRedisDown::Local => {}
            }
        }
        // One lock for the usual call: the windows (cached for the day) and the totals.
        let (windows, known) = {
            let mut state = self.lock();
            let windows = state.windows_at(now, &self.zone);
            (
                windows,
                state.known_spent(consumer, entry, windows.date(), self.shared.is_none()),
            )
        };
        let spent = match (known, &self.shared) {
            (Some(spent), _) => spent,
            (None, Some(shared)) => {
                self.first_read(shared, consumer, entry, windows.date())
                    .await
            }
            (None, None) => Spent::default(),
        };
        let mut standings = budget_standings(limits, &spent, &windows);
        if !refusing {
            standings.iter_mut().for_each(|s| s.refused = false);
        }
        Ok(standings)
    }

    /// What (consumer, entry) spent in the budgets' windows now, as the budgets see it.
    pub async fn spent(&self, consumer: &Arc<str>, entry: &Arc<str>) -> Spent {
        let now = self.clock.now();
        let today = {
            let mut state = self.lock();
            let today = state.windows_at(now, &self.zone).date();
            if let Some(spent) = state.known_spent(consumer, entry, today, self.shared.is_none()) {
                return spent;
            }
            today
        };
        match &self.shared {
            Some(shared) => self.first_read(shared, consumer, entry, today).await,
            None => Spent::default(),
        }
    }

    /// The first call on a pair in Redis mode: reads its totals (one round trip) and keeps a view.
    async fn first_read(
        &self,
        shared: &Shared,
        consumer: &Arc<str>,
        entry: &Arc<str>,
        today: Date,
    ) -> Spent {
        let sent = Instant::now();
        let read = if shared.store.is_up() {
            shared
                .store
                .usage_spent(&[(consumer, entry)], today)
                .await
                .ok()
                .and_then(|mut r| r.pop())
                .and_then(Result::ok)
        } else {
            None
        };
        let mut state = self.lock();
        let waiting = state.sums.spent(consumer, entry, today);
        let view = state
            .views
            .entry(consumer.clone())
            .or_default()
            .entry(entry.clone())
            .or_insert_with(View::new);
        if let Some(read) = read
            && view.read_sent.is_none_or(|s| s < sent)
        {
            view.read = read;
            view.read_date = Some(today);
            view.read_sent = Some(sent);
            view.confirmed.retain(|(at, _, _)| *at >= sent);
        }
        merge(view.spent(today), waiting)
    }

    /// Re-reads every view's totals (one pipeline per [`READ_CHUNK`] pairs) and drops idle views.
    async fn refresh_views(&self, shared: &Shared) {
        let today = SlotStamp::at(self.clock.now(), &self.zone).date;
        let pairs: Vec<Pair> = {
            let mut state = self.lock();
            let now = Instant::now();
            for entries in state.views.values_mut() {
                entries.retain(|_, v| {
                    if std::mem::take(&mut v.used) {
                        v.idle_since = None;
                    }
                    now.duration_since(*v.idle_since.get_or_insert(now)) < VIEW_IDLE
                });
            }
            state.views.retain(|_, entries| !entries.is_empty());
            state
                .views
                .iter()
                .flat_map(|(c, entries)| entries.keys().map(|e| (c.clone(), e.clone())))
                .collect()
        };
        for chunk in pairs.chunks(READ_CHUNK) {
            let sent = Instant::now();
            let names: Vec<(&str, &str)> = chunk.iter().map(|(c, e)| (&**c, &**e)).collect();
            let Ok(reads) = shared.store.usage_spent(&names, today).await else {
                return;
            };
            let mut state = self.lock();
            for (pair, read) in chunk.iter().zip(reads) {
                let (Ok(read), Some(view)) = (read, state.view_mut(&pair.0, &pair.1)) else {
                    continue;
                };
                view.read = read;
                view.read_date = Some(today);
                view.read_sent = Some(sent);
                view.confirmed.retain(|(at, _, _)| *at >= sent);
            }
        }
    }

    /// Writes waiting records and refreshes budget views until `stop`.
    pub async fn run_writer(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut last_refresh = Instant::now();
        loop {
            let wait = WRITE_INTERVAL.min(self.refresh);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            if !shared.store.is_up() {
                continue;
            }
            let _ = self.write_waiting(shared).await;
            if last_refresh.elapsed() >= self.refresh {
                last_refresh = Instant::now();
                self.refresh_views(shared).await;
            }
        }
    }

    /// At shutdown: writes what waits, for at most `limit`; returns how many records could not be.
    pub async fn final_flush(&self, limit: Duration) -> u64 {
        let Some(shared) = &self.shared else {
            return 0;
        };
        let deadline = tokio::time::Instant::now() + limit;
        while self.lock().waiting_records > 0 && tokio::time::Instant::now() < deadline {
            if shared.store.is_up() || shared.store.ping().await.is_ok() {
                let _ = tokio::time::timeout_at(deadline, self.write_waiting(shared)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let left = self.lock().waiting_records as u64;
        if left > 0 {
            self.metrics.dropped.increment(left);
            tracing::error!(
                records = left,
                "usage records not written to Redis before exit"
            );
        }
        left
    }

    /// A consumer's sums on `date`: the known entries first, then any other entry with records.
    pub async fn report(&self, consumer: &Arc<str>, date: Date, known: &[&str]) -> Report {
        let mut entries: Vec<(String, StoredDay)> = known
            .iter()
            .map(|id| (id.to_string(), StoredDay::default()))
            .collect();
        let Some(shared) = &self.shared else {
            self.lock().sums.add_to(consumer, date, &mut entries);
            return Report {
                entries,
                complete: true,
            };
        };
        let _gate = self.gate.write().await;
        let read = if shared.store.is_up() {
            shared.store.usage_report(consumer, date, known).await.ok()
        } else {
            None
        };
        let mut state = self.lock();
        let complete = read.is_some();
        let base = match read {
            Some(read) => {
                state.shown.insert((consumer.clone(), date), read.clone());
                Some(read)
            }
            None => state.shown.get(&(consumer.clone(), date)).cloned(),
        };
        for (id, stored) in base.unwrap_or_default() {
            match entries.iter_mut().find(|(known, _)| *known == id) {
                Some((_, target)) => *target = stored,
                None => entries.push((id, stored)),
            }
        }
        state.sums.add_to(consumer, date, &mut entries);
        Report { entries, complete }
    }

    /// A new local day: embedded sums and shown reports older than the retention go.
    fn roll_day(&self, state: &mut State, now: Timestamp) {
        let today = SlotStamp::at(now, &self.zone).date;
        if state.newest_date.is_some_and(|d| d >= today) {
            return;
        }
        state.newest_date = Some(today);
        let days = i64::from(self.retention_days);
        let oldest_day = today
            .checked_sub(jiff::Span::new().days(days))
            .unwrap_or(Date::MIN);
        let oldest_month = today
            .first_of_month()
            .checked_sub(jiff::Span::new().months(13))
            .unwrap_or(Date::MIN);
        state.sums.prune(oldest_day, oldest_month);
        state.shown.retain(|(_, d), _| *d >= today);
    }
}

fn merge(a: Spent, b: Spent) -> Spent {
    Spent {
        tokens_day: a.tokens_day.saturating_add(b.tokens_day),
        cost_day: a.cost_day.saturating_add(b.cost_day),
        cost_month: a.cost_month.saturating_add(b.cost_month),
    }
}

/// How long a record's id is remembered from: its arrival or its own time, whichever is later, so
/// a record dated ahead is never forgotten before it is too old to be accepted again.
fn keep_ms(record: &Prepared, now: Timestamp) -> i64 {
    now.as_millisecond().max(record.time.as_millisecond())
}

/// The stored form of a request id: the first 16 bytes of its SHA-256.
fn digest(request_id: &str) -> [u8; 16] {
    let full = Sha256::digest(request_id.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

fn log_unapplied(username: &str, outcome: &BatchOutcome) {
    match outcome {
        BatchOutcome::Refused { key, reason } => {
            tracing::error!(%key, %reason, consumer = %username, "usage records cannot be written; kept and retried");
        }
        BatchOutcome::Failed(error) => {
            tracing::warn!(%error, consumer = %username, "usage batch failed; retried");
        }
        BatchOutcome::Applied(_) => {}
    }
}

/// One entry's sums in one month that this process holds, for the billing export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldMonth {
    pub entry: Arc<str>,
    /// The sums of each local date of the month that has any.
    pub days: Vec<(Date, Totals)>,
    /// The month's sums.
    pub month: Totals,
}

/// What the billing export (`crate::admin::export`) reads of the sums in memory.
impl UsageBook {
    /// Redis mode: while the guard lives, no waiting record is written to Redis or settled, so
    /// Redis's sums and [`UsageBook::held`] never both hold one record (as `/api/usage` reads
    /// them). `None` in embedded mode, where memory is the only store.
    pub async fn hold_writes(&self) -> Option<tokio::sync::RwLockWriteGuard<'_, ()>> {
        match &self.shared {
            Some(_) => Some(self.gate.write().await),
            None => None,
        }
    }

    /// The consumers with sums held here in the month of `month`: embedded mode every record,
    /// Redis mode the records waiting for Redis.
    pub fn held_consumers(&self, month: Date) -> Vec<Arc<str>> {
        let month = month.first_of_month();
        let state = self.lock();
        let mut names: Vec<Arc<str>> = state
            .sums
            .by_consumer
            .iter()
            .filter(|(_, entries)| entries.values().any(|s| s.months.contains_key(&month)))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort_unstable();
        names
    }

    /// The sums of `consumer` in the month of `month` held here (see
    /// [`UsageBook::held_consumers`]), per entry.
    pub fn held(&self, consumer: &str, month: Date) -> Vec<HeldMonth> {
        let month = month.first_of_month();
        let last = month.last_of_month();
        let state = self.lock();
        let Some(entries) = state.sums.by_consumer.get(consumer) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|(entry, sums)| {
                let total = sums.months.get(&month).copied()?;
                Some(HeldMonth {
                    entry: entry.clone(),
                    days: sums
                        .days
                        .range(month..=last)
                        .map(|(date, day)| (*date, day.day))
                        .collect(),
                    month: total,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::core::usage::Amount;

    fn book(clock: Arc<ManualClock>) -> UsageBook {
        UsageBook::new(
            &UsageSettings::default(),
            35,
            TimeZone::UTC,
            clock,
            None,
            OnRedisDown::Local,
        )
    }

    fn record(id: &str, time: &str, input: u64, cost: u128) -> Prepared {
        Prepared {
            consumer: Arc::from("u"),
            entry: Arc::from("e"),
            request_id: id.into(),
            time: time.parse().unwrap(),
            totals: Totals {
                requests: 0,
                input,
                output: 1,
                cost: Amount(cost),
            },
        }
    }

    #[tokio::test]
    async fn embedded_sums_are_exact_and_ids_count_once() {
        let clock = Arc::new(ManualClock::new("2026-12-01T12:00:00Z".parse().unwrap()));
        let book = book(clock.clone());
        let first = book
            .record(vec![
                record("a", "2026-12-01T08:30:00Z", 10, 30_000),
                record("b", "2026-12-01T11:00:00Z", 5, 75_000),
                record("a", "2026-12-01T11:00:00Z", 99, 1),
            ])
            .await;
        assert_eq!(
            first,
            [Counted::Accepted, Counted::Accepted, Counted::Duplicate]
        );
        let report = book
            .report(&Arc::from("u"), "2026-12-01".parse().unwrap(), &[])
            .await;
        let (id, day) = &report.entries[0];
        assert_eq!(id, "e");
        assert_eq!(day.slots[4].input, 10);
        assert_eq!(day.slots[5].input, 5);
        assert_eq!(day.day.input, 15);
        assert_eq!(day.day.output, 2);
        assert_eq!(day.day.cost.plain(), "0.000000105");
        assert_eq!(day.month.cost, Amount(105_000));
        // Past the dedup window the id is forgotten (and such an old record would be refused).
        clock.set("2026-12-01T18:30:01Z".parse().unwrap());
        let again = book
            .record(vec![record("a", "2026-12-01T18:30:00Z", 1, 0)])
            .await;
        assert_eq!(again, [Counted::Accepted]);
    }

    #[tokio::test]
    async fn budgets_refuse_once_recorded_usage_reaches_them() {
        let clock = Arc::new(ManualClock::new("2026-12-01T12:00:00Z".parse().unwrap()));
        let book = book(clock);
        let limits = Limits {
            tokens_per_day: Some(20),
            cost_per_month: Some(crate::core::Decimal::parse("0.0000001").unwrap()),
            ..Limits::default()
        };
        let (c, e) = (Arc::from("u"), Arc::from("e"));
        let before = book.budgets(&c, &e, &limits, book.now()).await.unwrap();
        assert!(before.iter().all(|s| !s.refused));
        book.record(vec![record("a", "2026-12-01T08:00:00Z", 18, 50_000)])
            .await;
        let s = book.budgets(&c, &e, &limits, book.now()).await.unwrap();
        assert_eq!(
            (s[0].member, s[0].remaining, s[0].refused),
            ("tokens-day", 1, false)
        );
        assert!(!s[1].refused);
        book.record(vec![record("b", "2026-12-01T08:00:00Z", 0, 50_000)])
            .await;
        let s = book.budgets(&c, &e, &limits, book.now()).await.unwrap();
        assert!(s[0].refused, "19 + 1 tokens reach 20");
        assert!(s[1].refused, "0.0000001 reached exactly");
    }
}
