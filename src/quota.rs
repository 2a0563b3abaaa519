//! Request quotas (SPEC §8.1): the per-minute, per-slot and per-day limits of an entry, per
//! consumer, exact on one replica and never exceeded by many.
//!
//! Without Redis the counts live here and are exact. With Redis each replica *leases* quota: an
//! atomic script reserves a slice of what is left in a window (a sixteenth of the limit, or a
//! second of this replica's rate, never more than half of what is unreserved), and calls are
//! allowed from the slice with no Redis round trip until it runs low; then the next lease is taken
//! in the background. Leases are exactly-once (each names the holding it expects), the reserved
//! quota lives in keys of its own (`uma:quota:…`, never the TDL counters), and an idle replica
//! gives back what it did not use. So together the replicas never allow more than the limit, and
//! while calls keep coming on all of them they allow exactly the limit. A call takes quota only
//! when it is finally allowed: this is the last check before the 200.
//!
//! While Redis cannot be asked (the store's breaker says so, no waiting), `limits.on_redis_down`
//! decides: `local` keeps enforcing with the total last seen plus this replica's own calls, and
//! records those calls in Redis when it is back; `deny` answers 503; `allow` lets calls through.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::Equivalent;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use metrics::{Counter, Gauge, counter, gauge};
use rustc_hash::FxBuildHasher;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::OnRedisDown;
use crate::core::limits::Limits;
use crate::core::quota::{Standing, WindowLimit, lease_size, request_windows};
use crate::core::window::{Window, WindowId};
use crate::core::{RateLimitedBy, Refusal};
use crate::store::{QuotaReply, RedisStore, StoreError, keys};

type HashMap<K, V> = hashbrown::HashMap<K, V, FxBuildHasher>;

/// A replica that has not allowed a call in a window for this long gives its unused lease back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// After Redis said a window is exhausted, it is asked again at most this often (another replica
/// may give quota back).
const EXHAUSTED_RECHECK: Duration = Duration::from_secs(1);
/// Longest wait for another call's lease to come back.
const LEASE_WAIT: Duration = Duration::from_millis(250);
/// Past this a call that still has no decision is answered "cannot decide" (503).
const DECIDE_WITHIN: Duration = Duration::from_secs(2);
/// How often idle leases are returned and ended windows forgotten.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EntryKey {
    consumer: Arc<str>,
    entry: Arc<str>,
}

/// A borrowed [`EntryKey`], so a lookup clones no shared reference count.
#[derive(Hash)]
struct EntryKeyRef<'a> {
    consumer: &'a str,
    entry: &'a str,
}

impl Equivalent<EntryKey> for EntryKeyRef<'_> {
    fn equivalent(&self, key: &EntryKey) -> bool {
        self.entry == &*key.entry && self.consumer == &*key.consumer
    }
}

/// One window's counts on this replica.
#[derive(Debug, Clone)]
struct WindowQuota {
    window: Window,
    limit: u64,
    /// Calls this replica allowed in the window.
    used: u64,
    /// Quota this replica holds in Redis (cumulative; includes `used`).
    held: u64,
    /// Quota reserved by all replicas, as last seen.
    total: u64,
    /// A lease or a sync for this window is on its way.
    busy: bool,
    /// When Redis last had nothing left to lease.
    exhausted_at: Option<Timestamp>,
    /// When Redis answered this window's key with something that is not a quota hash.
    broken_at: Option<Timestamp>,
    last_call: Timestamp,
    lease_at: Timestamp,
    calls_since_lease: u64,
    last_lease: u64,
}

impl WindowQuota {
    fn new(limit: WindowLimit, now: Timestamp) -> WindowQuota {
        WindowQuota {
            window: limit.window,
            limit: limit.limit,
            used: 0,
            held: 0,
            total: 0,
            busy: false,
            exhausted_at: None,
            broken_at: None,
            last_call: now,
            lease_at: now,
            calls_since_lease: 0,
            last_lease: 0,
        }
    }

    fn limit(&self) -> WindowLimit {
        WindowLimit {
            window: self.window,
            limit: self.limit,
        }
    }
}

/// How a window is counted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No Redis: the counts here are all there is.
    Local,
    /// Redis answers: calls come out of this replica's lease.
    Leased,
    /// Redis is configured but cannot be asked.
    Down(OnRedisDown),
}

/// What one window says about a call.
enum Verdict {
    Allow,
    Refuse,
    /// Needs a lease first (or is waiting for one).
    Lease,
}

impl WindowQuota {
    fn available(&self, mode: Mode) -> u64 {
        match mode {
            Mode::Local => self.limit.saturating_sub(self.used),
            Mode::Leased => self.held.saturating_sub(self.used),
            Mode::Down(OnRedisDown::Allow) => u64::MAX,
            // What this replica holds, plus what nobody had reserved when Redis was last seen.
            Mode::Down(_) => {
                (self.held + self.limit.saturating_sub(self.total)).saturating_sub(self.used)
            }
        }
    }

    /// What remains for the RateLimit field: exact on one replica; with several it counts the
    /// others' unused leases as used (it can only err on the low side).
    fn remaining(&self, mode: Mode) -> u64 {
        let others = match mode {
            Mode::Local => 0,
            _ => self.total.saturating_sub(self.held),
        };
        self.limit.saturating_sub(self.used + others)
    }

    fn verdict(&self, mode: Mode, now: Timestamp) -> Verdict {
        if self.available(mode) > 0 {
            return Verdict::Allow;
        }
        let recently = |at: Option<Timestamp>| {
            at.is_some_and(|t| now.duration_since(t).unsigned_abs() < EXHAUSTED_RECHECK)
        };
        match mode {
            Mode::Leased if !recently(self.exhausted_at) => Verdict::Lease,
            _ => Verdict::Refuse,
        }
    }
}

#[derive(Default)]
struct EntryQuota {
    windows: [Option<WindowQuota>; 3],
}

#[derive(Default)]
struct State {
    entries: HashMap<EntryKey, EntryQuota>,
    /// Bumped each time leases come back, so a waiter that missed the wake-up does not wait.
    generation: u64,
}

/// Where leases come from.
struct Shared {
    store: Arc<RedisStore>,
    /// This process, as Redis knows its holdings.
    instance: String,
    on_redis_down: OnRedisDown,
}

/// One lease or sync to send, for the window at `index` of an entry.
struct Request {
    key: EntryKey,
    index: usize,
    window: WindowId,
    redis_key: String,
    kind: RequestKind,
    ttl_secs: u64,
}

enum RequestKind {
    Lease {
        believed: u64,
        want: u64,
        limit: u64,
    },
    Sync {
        used: u64,
    },
}

/// The request quotas of one service process.
pub struct Quotas {
    zone: TimeZone,
    clock: Arc<dyn Clock>,
    shared: Option<Shared>,
    state: Mutex<State>,
    lease_done: Notify,
    round_trips: Counter,
    unused: Gauge,
}

impl Quotas {
    pub fn new(
        zone: TimeZone,
        clock: Arc<dyn Clock>,
        store: Option<Arc<RedisStore>>,
        on_redis_down: OnRedisDown,
    ) -> Quotas {
        // Distinguishes this process's holdings from every other replica's and restart's.
        let instance = hex::encode(rand::random::<[u8; 8]>());
        Quotas {
            zone,
            clock,
            shared: store.map(|store| Shared {
                store,
                instance,
                on_redis_down,
            }),
            state: Mutex::new(State::default()),
            lease_done: Notify::new(),
            round_trips: counter!("uma_quota_round_trips_total"),
            unused: gauge!("uma_quota_leased_unused"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mode(&self, window: &WindowQuota, now: Timestamp) -> Mode {
        let Some(shared) = &self.shared else {
            return Mode::Local;
        };
        let broken = window
            .broken_at
            .is_some_and(|t| now.duration_since(t).unsigned_abs() < EXHAUSTED_RECHECK);
        if shared.store.is_up() && !broken {
            Mode::Leased
        } else {
            Mode::Down(shared.on_redis_down)
        }
    }

    /// Takes one call from every request limit of `limits` for (consumer, entry), or refuses it:
    /// 429 with the windows that refused, or 503 with `on_redis_down = "deny"` while Redis is down.
    /// On success returns the windows' standings, for the answer's RateLimit fields.
    pub async fn take(
        self: &Arc<Self>,
        consumer: &Arc<str>,
        entry: &Arc<str>,
        limits: &Limits,
    ) -> Result<Vec<Standing>, Refusal> {
        // Each turn either decides or waits for a lease that is on its way (the store's timeout
        // and breaker bound each); under contention others are being served meanwhile.
        let deadline = tokio::time::Instant::now() + DECIDE_WITHIN;
        while tokio::time::Instant::now() < deadline {
            match self.try_take(consumer, entry, limits) {
                Attempt::Done(result, prefetch) => {
                    if !prefetch.is_empty() {
                        // Off the call's path: this call already has its quota.
                        let this = Arc::clone(self);
                        tokio::spawn(async move { this.send(prefetch).await });
                    }
                    return result;
                }
                Attempt::Send(requests) => self.send(requests).await,
                Attempt::Wait(generation) => {
                    let notified = self.lease_done.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if self.lock().generation == generation {
                        let _ = tokio::time::timeout(LEASE_WAIT, notified).await;
                    }
                }
            }
        }
        // Leases kept coming back without quota settling: cannot decide.
        Err(Refusal::Unavailable)
    }

    /// The request windows' standings without taking a call, for an answer another limit refused:
    /// what this replica knows (a window it has not counted in yet shows its whole limit); one
    /// with nothing left counts as refusing.
    pub fn peek(&self, consumer: &str, entry: &str, limits: &Limits) -> Vec<Standing> {
        let now = self.clock.now();
        let windows = request_windows(limits, now, &self.zone);
        let state = self.lock();
        let quota = state.entries.get(&EntryKeyRef { consumer, entry });
        windows
            .iter()
            .enumerate()
            .filter_map(|(i, limit)| {
                let limit = (*limit)?;
                let remaining = quota
                    .and_then(|q| q.windows[i].as_ref())
                    .filter(|w| w.window.id == limit.window.id)
                    .map_or(limit.limit, |w| w.remaining(self.mode(w, now)));
                Some(Standing {
                    member: limit.window.kind.name(),
                    limit,
                    remaining,
                    refused: remaining == 0,
                })
            })
            .collect()
    }

    fn try_take(&self, consumer: &Arc<str>, entry: &Arc<str>, limits: &Limits) -> Attempt {
        let now = self.clock.now();
        let windows = request_windows(limits, now, &self.zone);
        let mut state = self.lock();
        let generation = state.generation;
        let lookup = EntryKeyRef { consumer, entry };
        let quota = match state.entries.get_mut(&lookup) {
            Some(quota) => quota,
            None => state
                .entries
                .entry(EntryKey {
                    consumer: consumer.clone(),
                    entry: entry.clone(),
                })
                .or_default(),
        };
        let mut verdicts: [Option<(Verdict, Mode)>; 3] = [None, None, None];
        for (i, limit) in windows.iter().enumerate() {
            let slot = &mut quota.windows[i];
            let Some(limit) = limit else {
                *slot = None;
                continue;
            };
            match slot {
                Some(w) if w.window.id == limit.window.id => w.limit = limit.limit,
                _ => *slot = Some(WindowQuota::new(*limit, now)),
            }
            if let Some(w) = slot {
                let mode = self.mode(w, now);
                if mode == Mode::Down(OnRedisDown::Deny) {
                    return Attempt::Done(Err(Refusal::Unavailable), Vec::new());
                }
                verdicts[i] = Some((w.verdict(mode, now), mode));
            }
        }
        let refused = verdicts
            .iter()
            .flatten()
            .any(|(v, _)| matches!(v, Verdict::Refuse));
        let needs_lease = verdicts
            .iter()
            .flatten()
            .any(|(v, _)| matches!(v, Verdict::Lease));
        if refused {
            return Attempt::Done(Err(refusal(quota, &verdicts, now)), Vec::new());
        }
        if needs_lease {
            let key = EntryKey {
                consumer: consumer.clone(),
                entry: entry.clone(),
            };
            return self.lease_for(generation, quota, &verdicts, key, now);
        }
        // Every window allows: take one call from each.
        let mut prefetch = Vec::new();
        for (i, w) in quota.windows.iter_mut().enumerate() {
            let Some(w) = w else { continue };
            w.used += 1;
            w.calls_since_lease += 1;
            w.last_call = now;
            if let Some(request) = self.prefetch(w, i, consumer, entry, now) {
                w.busy = true;
                prefetch.push(request);
            }
        }
        Attempt::Done(Ok(standings(quota, &verdicts)), prefetch)
    }

    /// The leases the windows that lack quota need; if one is already on its way, wait for it.
    fn lease_for(
        &self,
        generation: u64,
        quota: &mut EntryQuota,
        verdicts: &[Option<(Verdict, Mode)>; 3],
        key: EntryKey,
        now: Timestamp,
    ) -> Attempt {
        let mut requests = Vec::new();
        for (i, w) in quota.windows.iter_mut().enumerate() {
            let (Some(w), Some((Verdict::Lease, _))) = (w, &verdicts[i]) else {
                continue;
            };
            if w.busy {
                return Attempt::Wait(generation);
            }
            w.busy = true;
            requests.push(self.lease_request(w, i, &key, now));
        }
        Attempt::Send(requests)
    }

    fn lease_request(
        &self,
        w: &WindowQuota,
        index: usize,
        key: &EntryKey,
        now: Timestamp,
    ) -> Request {
        let elapsed = now.duration_since(w.lease_at).as_secs_f64().max(1.0);
        let rate = (w.calls_since_lease as f64 / elapsed) as u64;
        Request {
            key: key.clone(),
            index,
            window: w.window.id,
            redis_key: keys::quota(&key.consumer, &key.entry, &w.window.id),
            kind: RequestKind::Lease {
                believed: w.held,
                want: lease_size(w.limit, w.limit.saturating_sub(w.total), rate),
                limit: w.limit,
            },
            ttl_secs: w.window.secs_until_end(now) + 60,
        }
    }

    /// A lease to take ahead of need when this replica's slice runs low.
    fn prefetch(
        &self,
        w: &WindowQuota,
        index: usize,
        consumer: &Arc<str>,
        entry: &Arc<str>,
        now: Timestamp,
    ) -> Option<Request> {
        let low = w.held.saturating_sub(w.used) <= (w.last_lease / 4).max(1);
        let worth = self.mode(w, now) == Mode::Leased && !w.busy && w.total < w.limit && low;
        let key = EntryKey {
            consumer: consumer.clone(),
            entry: entry.clone(),
        };
        worth.then(|| self.lease_request(w, index, &key, now))
    }

    /// Sends leases and syncs (one round trip each), then records what Redis answered.
    async fn send(&self, requests: Vec<Request>) {
        let Some(shared) = &self.shared else { return };
        let mut replies = Vec::with_capacity(requests.len());
        for request in &requests {
            self.round_trips.increment(1);
            let reply = match request.kind {
                RequestKind::Lease {
                    believed,
                    want,
                    limit,
                } => {
                    shared
                        .store
                        .quota_lease(
                            &request.redis_key,
                            &shared.instance,
                            believed,
                            want,
                            limit,
                            request.ttl_secs,
                        )
                        .await
                }
                RequestKind::Sync { used } => {
                    shared
                        .store
                        .quota_sync(&request.redis_key, &shared.instance, used, request.ttl_secs)
                        .await
                }
            };
            replies.push(reply);
        }
        let now = self.clock.now();
        let mut state = self.lock();
        for (request, reply) in requests.iter().zip(replies) {
            let Some(w) = state
                .entries
                .get_mut(&request.key)
                .and_then(|q| q.windows[request.index].as_mut())
                .filter(|w| w.window.id == request.window)
            else {
                continue; // the window ended meanwhile
            };
            w.busy = false;
            record(w, &request.kind, reply, &request.redis_key, now);
        }
        state.generation += 1;
        drop(state);
        self.lease_done.notify_waiters();
    }

    /// Returns idle replicas' unused leases, records calls allowed while Redis was down, forgets
    /// ended windows. Runs until the process ends.
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            let requests = self.upkeep_requests();
            if !requests.is_empty() {
                self.send(requests).await;
            }
        }
    }

    fn upkeep_requests(&self) -> Vec<Request> {
        let now = self.clock.now();
        let mut state = self.lock();
        let mut requests = Vec::new();
        let mut unused = 0u64;
        state.entries.retain(|key, quota| {
            for (i, slot) in quota.windows.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|w| w.window.end <= now) {
                    *slot = None;
                }
                let Some(w) = slot else { continue };
                unused += w.held.saturating_sub(w.used);
                if self.mode(w, now) != Mode::Leased || w.busy {
                    continue;
                }
                let idle = now.duration_since(w.last_call).unsigned_abs() >= IDLE_RELEASE;
                if (idle && w.held > w.used) || w.used > w.held {
                    // Stop drawing on the slice before giving it back.
                    w.held = w.used.min(w.held);
                    w.busy = true;
                    requests.push(Request {
                        key: key.clone(),
                        index: i,
                        window: w.window.id,
                        redis_key: keys::quota(&key.consumer, &key.entry, &w.window.id),
                        kind: RequestKind::Sync { used: w.used },
                        ttl_secs: w.window.secs_until_end(now) + 60,
                    });
                }
            }
            quota.windows.iter().any(Option::is_some)
        });
        self.unused.set(unused as f64);
        requests
    }
}

enum Attempt {
    /// Decided; with leases to take ahead of need.
    Done(Result<Vec<Standing>, Refusal>, Vec<Request>),
    Send(Vec<Request>),
    /// A lease for this entry is on its way; the generation seen when it was.
    Wait(u64),
}

/// Applies a lease's or a sync's answer to the window it was for.
fn record(
    w: &mut WindowQuota,
    kind: &RequestKind,
    reply: Result<QuotaReply, StoreError>,
    redis_key: &str,
    now: Timestamp,
) {
    match reply {
        Ok(reply) => {
            w.broken_at = None;
            if let RequestKind::Lease { .. } = kind {
                w.last_lease = reply.held.saturating_sub(w.held);
                w.lease_at = now;
                w.calls_since_lease = 0;
                w.exhausted_at = (reply.held <= w.used).then_some(now);
            }
            w.held = reply.held;
            w.total = reply.total;
        }
        Err(StoreError::Rejected(error)) => {
            tracing::error!(key = %redis_key, %error, "quota key unusable; counted locally meanwhile");
            w.broken_at = Some(now);
        }
        // An outage: the breaker is open now, and the next call counts in its down mode.
        Err(_) => {}
    }
}

/// The windows' standings after a decision.
fn standings(quota: &EntryQuota, verdicts: &[Option<(Verdict, Mode)>; 3]) -> Vec<Standing> {
    quota
        .windows
        .iter()
        .zip(verdicts)
        .filter_map(|(w, v)| {
            let (w, (verdict, mode)) = (w.as_ref()?, v.as_ref()?);
            Some(Standing {
                member: w.window.kind.name(),
                limit: w.limit(),
                remaining: w.remaining(*mode),
                refused: matches!(verdict, Verdict::Refuse),
            })
        })
        .collect()
}

fn refusal(quota: &EntryQuota, verdicts: &[Option<(Verdict, Mode)>; 3], now: Timestamp) -> Refusal {
    Refusal::RateLimited(Box::new(RateLimitedBy::of(
        &standings(quota, verdicts),
        now,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::core::RateLimitFields;
    use crate::core::limits::SlotLimit;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn embedded(clock: Arc<ManualClock>) -> Arc<Quotas> {
        Arc::new(Quotas::new(TimeZone::UTC, clock, None, OnRedisDown::Local))
    }

    fn names() -> (Arc<str>, Arc<str>) {
        ("user".into(), "entry".into())
    }

    #[tokio::test]
    async fn one_replica_allows_exactly_the_limit_under_concurrency() {
        let clock = Arc::new(ManualClock::new(ts("2026-12-01T10:00:00Z")));
        let quotas = embedded(clock);
        let limits = Arc::new(Limits {
            requests_per_day: Some(50),
            ..Limits::default()
        });
        let tasks: Vec<_> = (0..150)
            .map(|_| {
                let (quotas, limits) = (quotas.clone(), limits.clone());
                tokio::spawn(async move {
                    let (c, e) = names();
                    quotas.take(&c, &e, &limits).await.is_ok()
                })
            })
            .collect();
        let mut allowed = 0;
        for task in tasks {
            allowed += usize::from(task.await.unwrap());
        }
        assert_eq!(allowed, 50);
    }

    #[tokio::test]
    async fn each_window_refuses_at_its_limit_and_resets_with_it() {
        let clock = Arc::new(ManualClock::new(ts("2026-12-01T10:00:30Z")));
        let quotas = embedded(clock.clone());
        let limits = Limits {
            requests_per_minute: Some(2),
            requests_per_slot: Some(SlotLimit::Every(3)),
            requests_per_day: Some(4),
            ..Limits::default()
        };
        let (c, e) = names();
        let now = ts("2026-12-01T10:00:30Z");
        let first = RateLimitFields::of(&quotas.take(&c, &e, &limits).await.unwrap(), now);
        assert_eq!(
            first.policy,
            r#""minute";q=2;w=60, "slot";q=3;w=7200, "day";q=4;w=86400"#
        );
        assert_eq!(
            first.state,
            r#""minute";r=1;t=30, "slot";r=2;t=7170, "day";r=3;t=50370"#
        );
        assert!(quotas.take(&c, &e, &limits).await.is_ok());
        let Err(Refusal::RateLimited(by)) = quotas.take(&c, &e, &limits).await else {
            panic!("the minute's third call must be refused");
        };
        assert_eq!(by.retry_after, 30);
        assert!(
            by.fields.state.starts_with(r#""minute";r=0;t=30"#),
            "{}",
            by.fields.state
        );
        // A refused call took nothing: the next minute has the slot's last call.
        clock.set(ts("2026-12-01T10:01:00Z"));
        let now = ts("2026-12-01T10:01:00Z");
        let third = RateLimitFields::of(&quotas.take(&c, &e, &limits).await.unwrap(), now);
        assert!(third.state.contains(r#""slot";r=0;"#), "{}", third.state);
        let Err(Refusal::RateLimited(by)) = quotas.take(&c, &e, &limits).await else {
            panic!("the slot's fourth call must be refused");
        };
        assert_eq!(by.retry_after, 7_140);
        // Next slot: the day has one call left.
        clock.set(ts("2026-12-01T12:00:00Z"));
        assert!(quotas.take(&c, &e, &limits).await.is_ok());
        let Err(Refusal::RateLimited(by)) = quotas.take(&c, &e, &limits).await else {
            panic!("the day's fifth call must be refused");
        };
        assert_eq!(by.retry_after, 43_200);
    }

    #[tokio::test]
    async fn zero_refuses_the_first_call_and_consumers_have_their_own_quota() {
        let clock = Arc::new(ManualClock::new(ts("2026-12-01T10:00:00Z")));
        let quotas = embedded(clock);
        let zero = Limits {
            requests_per_minute: Some(0),
            ..Limits::default()
        };
        let (c, e) = names();
        assert!(matches!(
            quotas.take(&c, &e, &zero).await,
            Err(Refusal::RateLimited(_))
        ));
        let one = Limits {
            requests_per_day: Some(1),
            ..Limits::default()
        };
        let other: Arc<str> = "other-user".into();
        assert!(quotas.take(&c, &e, &one).await.is_ok());
        assert!(quotas.take(&other, &e, &one).await.is_ok());
        assert!(quotas.take(&c, &e, &one).await.is_err());
    }
}
