//! TDL usage counters: allowed calls per consumer, entry, local date and two-hour slot (SPEC §7).
//!
//! Slots are reckoned in the configured IANA zone from civil (local) time, so a zone with an offset
//! such as Asia/Seoul rolls its date at local midnight. In embedded mode the counters live here, in
//! process; days older than the retention period are pruned when a new day starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::civil::Date;
use jiff::tz::TimeZone;

use crate::clock::Clock;
use crate::core::model::SLOTS;

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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CounterKey {
    consumer: Arc<str>,
    entry: Arc<str>,
    date: Date,
}

/// In-process counters.
pub struct TdlCounters {
    zone: TimeZone,
    clock: Arc<dyn Clock>,
    retention_days: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    counts: HashMap<CounterKey, DayUsage>,
    newest_date: Option<Date>,
}

impl TdlCounters {
    pub fn new(zone: TimeZone, clock: Arc<dyn Clock>, retention_days: u32) -> TdlCounters {
        TdlCounters {
            zone,
            clock,
            retention_days: i64::from(retention_days),
            state: Mutex::new(State::default()),
        }
    }

    pub fn zone(&self) -> &TimeZone {
        &self.zone
    }

    pub fn now(&self) -> SlotStamp {
        SlotStamp::at(self.clock.now(), &self.zone)
    }

    /// Counts one allowed call, now.
    pub fn record(&self, consumer: &Arc<str>, entry: &Arc<str>) {
        let stamp = self.now();
        let key = CounterKey {
            consumer: consumer.clone(),
            entry: entry.clone(),
            date: stamp.date,
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.newest_date.is_none_or(|d| d < stamp.date) {
            state.newest_date = Some(stamp.date);
            self.prune(&mut state, stamp.date);
        }
        state.counts.entry(key).or_default()[usize::from(stamp.slot) - 1] += 1;
    }

    fn prune(&self, state: &mut State, today: Date) {
        let oldest_kept = today
            .checked_sub(jiff::Span::new().days(self.retention_days - 1))
            .unwrap_or(today);
        state.counts.retain(|key, _| key.date >= oldest_kept);
    }

    /// Every entry the consumer used on `date`, with its counts.
    pub fn usage(&self, consumer: &str, date: Date) -> Vec<(Arc<str>, DayUsage)> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(Arc<str>, DayUsage)> = state
            .counts
            .iter()
            .filter(|(k, _)| &*k.consumer == consumer && k.date == date)
            .map(|(k, v)| (k.entry.clone(), *v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
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

    #[test]
    fn counts_per_slot_and_day_rollover() {
        let seoul = TimeZone::get("Asia/Seoul").unwrap();
        let clock = Arc::new(ManualClock::new(ts("2026-11-27T14:30:00Z")));
        let counters = TdlCounters::new(seoul, clock.clone(), 35);
        let (c, e): (Arc<str>, Arc<str>) = ("user1".into(), "kt".into());
        counters.record(&c, &e);
        counters.record(&c, &e);
        clock.set(ts("2026-11-27T15:00:00Z")); // local midnight
        counters.record(&c, &e);
        let day1 = counters.usage("user1", jiff::civil::date(2026, 11, 27));
        assert_eq!(day1[0].1[11], 2);
        let day2 = counters.usage("user1", jiff::civil::date(2026, 11, 28));
        assert_eq!(day2[0].1[0], 1);
        assert_eq!(day2[0].1.iter().sum::<u64>(), 1);
        assert!(
            counters
                .usage("other", jiff::civil::date(2026, 11, 28))
                .is_empty()
        );
    }

    #[test]
    fn old_days_are_pruned() {
        let clock = Arc::new(ManualClock::new(ts("2026-11-01T10:00:00Z")));
        let counters = TdlCounters::new(TimeZone::UTC, clock.clone(), 2);
        let (c, e): (Arc<str>, Arc<str>) = ("u".into(), "e".into());
        counters.record(&c, &e);
        clock.set(ts("2026-11-02T10:00:00Z"));
        counters.record(&c, &e);
        assert_eq!(counters.usage("u", jiff::civil::date(2026, 11, 1)).len(), 1);
        clock.set(ts("2026-11-03T10:00:00Z"));
        counters.record(&c, &e);
        assert!(
            counters
                .usage("u", jiff::civil::date(2026, 11, 1))
                .is_empty()
        );
        assert_eq!(counters.usage("u", jiff::civil::date(2026, 11, 2)).len(), 1);
    }
}
