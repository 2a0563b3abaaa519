//! TDL usage counters: allowed calls per consumer, entry, local date and two-hour slot (SPEC §7).
//!
//! Slots are reckoned in the configured IANA zone from civil (local) time, so a zone such as
//! Asia/Seoul rolls its date at local midnight. Increments always land in memory first. Without
//! Redis that is where they live (days past the retention period are pruned). With Redis a single
//! flusher writes them in batches: every `flush_interval_ms` (`async`), or as soon as a call waits
//! for its increment (`sync`, several waiting calls sharing one write). Each batch carries this
//! instance's next sequence number and is retried until Redis confirms it; Redis applies a
//! consumer's share only if its sequence is new, so a batch whose first write timed out is never
//! applied twice. Batches are written strictly one after another, which is what makes "new" a
//! simple comparison.

use hashbrown::Equivalent;
use rustc_hash::FxBuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use metrics::{Counter, Gauge, counter, gauge};
use tokio::sync::{Notify, oneshot};

use crate::clock::Clock;
use crate::config::{TdlMode, TdlSettings};
use crate::core::model::SLOTS;
use crate::store::{ConsumerBatch, CounterDelta, RedisStore, StoreError};

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

type HashMap<K, V> = hashbrown::HashMap<K, V, FxBuildHasher>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CounterKey {
    consumer: Arc<str>,
    entry: Arc<str>,
    date: Date,
}

/// A borrowed [`CounterKey`] (same hash), so counting an existing counter clones nothing: cloning
/// the `Arc`s would touch reference counts every worker thread shares.
#[derive(Hash)]
struct CounterKeyRef<'a> {
    consumer: &'a str,
    entry: &'a str,
    date: Date,
}

impl Equivalent<CounterKey> for CounterKeyRef<'_> {
    fn equivalent(&self, key: &CounterKey) -> bool {
        self.date == key.date && self.entry == &*key.entry && self.consumer == &*key.consumer
    }
}

/// Increments taken out of `pending` to be written as one batch.
struct Batch {
    seq: u64,
    counts: HashMap<CounterKey, DayUsage>,
}

#[derive(Default)]
struct State {
    /// Embedded mode: every count. Redis mode: increments not yet in a batch.
    pending: HashMap<CounterKey, DayUsage>,
    /// Calls (sync mode) waiting for their increment to reach Redis.
    waiters: Vec<oneshot::Sender<()>>,
    /// The batch being written (or to retry); newer increments wait in `pending` meanwhile.
    in_flight: Option<Arc<Batch>>,
    next_seq: u64,
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

    fn buffered_keys(&self) -> usize {
        self.pending.len() + self.in_flight.as_ref().map_or(0, |b| b.counts.len())
    }

    fn buffered_increments(&self) -> u64 {
        let sum = |m: &HashMap<CounterKey, DayUsage>| m.values().flatten().sum::<u64>();
        sum(&self.pending) + self.in_flight.as_ref().map_or(0, |b| sum(&b.counts))
    }
}

/// Where counters go when Redis is configured.
struct Sink {
    store: Arc<RedisStore>,
    /// Distinguishes this process's batches from every other replica's and restart's.
    instance: String,
    mode: TdlMode,
    wake: Notify,
    flush_interval: Duration,
    retention_secs: u64,
}

/// The counters of one service process.
pub struct TdlCounters {
    zone: TimeZone,
    clock: Arc<dyn Clock>,
    retention_days: i64,
    max_pending_keys: usize,
    state: Mutex<State>,
    sink: Option<Sink>,
    increments: Counter,
    dropped: Counter,
    pending_gauge: Gauge,
}

/// `/api/tdl-matrix` could not read Redis.
#[derive(Debug)]
pub struct UsageUnavailable;

impl TdlCounters {
    pub fn new(
        zone: TimeZone,
        clock: Arc<dyn Clock>,
        settings: &TdlSettings,
        store: Option<Arc<RedisStore>>,
    ) -> TdlCounters {
        let sink = store.map(|store| Sink {
            store,
            instance: instance_id(),
            mode: settings.mode,
            wake: Notify::new(),
            flush_interval: Duration::from_millis(settings.flush_interval_ms),
            retention_secs: u64::from(settings.retention_days) * 86_400,
        });
        TdlCounters {
            zone,
            clock,
            retention_days: i64::from(settings.retention_days),
            max_pending_keys: settings.max_pending_keys,
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
            sink,
            increments: counter!("uma_tdl_increments_total"),
            dropped: counter!("uma_tdl_dropped_total"),
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
        let mut state = self.lock();
        let stamp = state.stamp_at(now, &self.zone);
        let lookup = CounterKeyRef {
            consumer,
            entry,
            date: stamp.date,
        };
        if self.sink.is_none() && state.newest_date.is_none_or(|d| d < stamp.date) {
            state.newest_date = Some(stamp.date);
            self.prune(&mut state, stamp.date);
        }
        let slot = usize::from(stamp.slot) - 1;
        if let Some(day) = state.pending.get_mut(&lookup) {
            day[slot] += 1;
        } else if state.buffered_keys() < self.max_pending_keys {
            let key = CounterKey {
                consumer: consumer.clone(),
                entry: entry.clone(),
                date: stamp.date,
            };
            state.pending.entry(key).or_default()[slot] += 1;
        } else {
            drop(state);
            self.dropped.increment(1);
            return None;
        }
        self.increments.increment(1);
        let sink = self.sink.as_ref()?;
        if sink.mode != TdlMode::Sync || !sink.store.is_up() {
            return None;
        }
        let (done, wait) = oneshot::channel();
        state.waiters.push(done);
        drop(state);
        sink.wake.notify_one();
        Some(wait)
    }

    fn prune(&self, state: &mut State, today: Date) {
        let oldest_kept = today
            .checked_sub(jiff::Span::new().days(self.retention_days - 1))
            .unwrap_or(today);
        state.pending.retain(|key, _| key.date >= oldest_kept);
    }

    /// The consumer's counts for `date`: entry ids (at least `known`, plus any used that day).
    pub async fn usage(
        &self,
        consumer: &str,
        date: Date,
        known: &[&str],
    ) -> Result<Vec<(String, DayUsage)>, UsageUnavailable> {
        let (pending, pending_seq, in_flight) = {
            let state = self.lock();
            let pick = |m: &HashMap<CounterKey, DayUsage>| -> Vec<(String, DayUsage)> {
                m.iter()
                    .filter(|(k, _)| &*k.consumer == consumer && k.date == date)
                    .map(|(k, v)| (k.entry.to_string(), *v))
                    .collect()
            };
            let in_flight = state.in_flight.as_ref().map(|b| (b.seq, pick(&b.counts)));
            (pick(&state.pending), state.next_seq, in_flight)
        };
        let mut total: Vec<(String, DayUsage)> = known
            .iter()
            .map(|id| (id.to_string(), [0; SLOTS]))
            .collect();
        let Some(sink) = &self.sink else {
            add_all(&mut total, pending);
            return Ok(total);
        };
        if !sink.store.is_up() {
            return Err(UsageUnavailable);
        }
        let stored = sink
            .store
            .read_usage(consumer, date, &sink.instance, known)
            .await
            .map_err(|_| UsageUnavailable)?;
        add_all(&mut total, stored.entries);
        // Local increments count unless Redis already has them (their batch sequence is applied).
        if let Some((_, counts)) = in_flight.filter(|(seq, _)| *seq > stored.applied_seq) {
            add_all(&mut total, counts);
        }
        if pending_seq > stored.applied_seq {
            add_all(&mut total, pending);
        }
        Ok(total)
    }

    /// Writes what is buffered: retries the batch in flight, or forms one from `pending`.
    /// Returns whether a batch was confirmed.
    async fn flush_once(&self) -> Result<bool, StoreError> {
        let Some(sink) = &self.sink else {
            return Ok(false);
        };
        let (batch, waiters) = {
            let mut state = self.lock();
            let mut waiters = Vec::new();
            if state.in_flight.is_none() && !state.pending.is_empty() {
                let seq = state.next_seq;
                state.next_seq += 1;
                state.in_flight = Some(Arc::new(Batch {
                    seq,
                    counts: std::mem::take(&mut state.pending),
                }));
                waiters = std::mem::take(&mut state.waiters);
            }
            self.pending_gauge.set(state.buffered_increments() as f64);
            (state.in_flight.clone(), waiters)
        };
        let Some(batch) = batch else { return Ok(false) };
        if !sink.store.is_up() {
            self.release_waiters();
            return Err(StoreError::Unavailable("redis is down".into()));
        }
        let groups = consumer_batches(&batch.counts);
        match sink
            .store
            .apply_batch(&sink.instance, batch.seq, sink.retention_secs, &groups)
            .await
        {
            Ok(()) => {
                let mut state = self.lock();
                if state.in_flight.as_ref().is_some_and(|b| b.seq == batch.seq) {
                    state.in_flight = None;
                }
                self.pending_gauge.set(state.buffered_increments() as f64);
                drop(state);
                for waiter in waiters {
                    let _ = waiter.send(());
                }
                Ok(true)
            }
            Err(error) => {
                // The batch stays in flight for the next try; nobody waits on it meanwhile.
                drop(waiters);
                self.release_waiters();
                Err(error)
            }
        }
    }

    /// Lets every waiting call go: its increment stays buffered and is written later.
    fn release_waiters(&self) {
        let waiters = std::mem::take(&mut self.lock().waiters);
        drop(waiters);
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
            while let Ok(true) = self.flush_once().await {
                if sink.mode == TdlMode::Async {
                    break;
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
            let empty = {
                let state = self.lock();
                state.pending.is_empty() && state.in_flight.is_none()
            };
            if empty || tokio::time::Instant::now() >= deadline {
                break;
            }
            if !sink.store.is_up() {
                let _ = tokio::time::timeout_at(deadline, sink.store.ping()).await;
            }
            if tokio::time::timeout_at(deadline, self.flush_once())
                .await
                .is_err()
            {
                break;
            }
            if !sink.store.is_up() {
                tokio::time::sleep_until(
                    deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                )
                .await;
            }
        }
        let left = self.lock().buffered_increments();
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

fn add_all(total: &mut Vec<(String, DayUsage)>, more: Vec<(String, DayUsage)>) {
    for (id, usage) in more {
        match total.iter_mut().find(|(t, _)| *t == id) {
            Some((_, sum)) => {
                for (s, n) in sum.iter_mut().zip(usage) {
                    *s += n;
                }
            }
            None => total.push((id, usage)),
        }
    }
}

/// Groups a batch by consumer: one script call (and one Cluster slot) each.
fn consumer_batches(counts: &HashMap<CounterKey, DayUsage>) -> Vec<ConsumerBatch> {
    let mut by_consumer: HashMap<Arc<str>, Vec<CounterDelta>> = HashMap::default();
    for (key, slots) in counts {
        by_consumer
            .entry(key.consumer.clone())
            .or_default()
            .push(CounterDelta {
                entry: key.entry.clone(),
                date: key.date,
                slots: *slots,
            });
    }
    by_consumer
        .into_iter()
        .map(|(username, counters)| ConsumerBatch { username, counters })
        .collect()
}

/// A random id for this process: batches of different replicas and restarts never collide.
fn instance_id() -> String {
    let bytes: [u8; 8] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn settings(retention_days: u32, max_pending_keys: usize) -> TdlSettings {
        TdlSettings {
            retention_days,
            max_pending_keys,
            ..TdlSettings::default()
        }
    }

    fn embedded(zone: TimeZone, clock: Arc<ManualClock>, retention_days: u32) -> TdlCounters {
        TdlCounters::new(zone, clock, &settings(retention_days, 1000), None)
    }

    async fn usage(counters: &TdlCounters, consumer: &str, date: Date) -> Vec<(String, DayUsage)> {
        counters.usage(consumer, date, &[]).await.unwrap()
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
            .await
            .unwrap();
        assert_eq!(known, vec![("x".to_owned(), [0; SLOTS])]);
    }

    #[tokio::test]
    async fn old_days_are_pruned() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = embedded(TimeZone::UTC, clock.clone(), 2);
        let (c, e): (Arc<str>, Arc<str>) = ("u".into(), "e".into());
        counters.record(&c, &e);
        clock.set(ts("2026-11-02T10:00:00Z"));
        counters.record(&c, &e);
        assert_eq!(
            usage(&counters, "u", jiff::civil::date(2026, 11, 1))
                .await
                .len(),
            1
        );
        clock.set(ts("2026-11-03T10:00:00Z"));
        counters.record(&c, &e);
        assert!(
            usage(&counters, "u", jiff::civil::date(2026, 11, 1))
                .await
                .is_empty()
        );
        assert_eq!(
            usage(&counters, "u", jiff::civil::date(2026, 11, 2))
                .await
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn the_buffer_is_bounded() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = TdlCounters::new(TimeZone::UTC, clock, &settings(35, 2), None);
        let c: Arc<str> = "u".into();
        for entry in ["a", "b", "c", "a"] {
            counters.record(&c, &entry.into());
        }
        let used = usage(&counters, "u", jiff::civil::date(2026, 11, 1)).await;
        let ids: Vec<&str> = used.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(!ids.contains(&"c"));
    }

    #[test]
    fn batches_group_by_consumer() {
        let mut counts = HashMap::default();
        let d = jiff::civil::date(2026, 11, 1);
        for (c, e) in [("u1", "a"), ("u1", "b"), ("u2", "a")] {
            counts.insert(
                CounterKey {
                    consumer: c.into(),
                    entry: e.into(),
                    date: d,
                },
                [1; SLOTS],
            );
        }
        let mut batches = consumer_batches(&counts);
        batches.sort_by(|a, b| a.username.cmp(&b.username));
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].counters.len(), 2);
        assert_ne!(instance_id(), instance_id());
    }
}
