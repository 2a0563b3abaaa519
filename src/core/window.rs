//! The windows limits are counted in: the UTC calendar minute, the local two-hour slot, the local
//! day and the local month (SPEC §7, §8.1).
//!
//! Boundaries of local windows are computed in civil time and then converted, never by adding
//! hours to an instant: on a DST day in `America/New_York` the slot `T2` lasts one hour (clocks
//! jump from 02:00 to 03:00) and `T1` three (01:00–01:59 happens twice), and the day 23 or 25
//! hours. A civil time that falls in a gap is read as jiff's "compatible" instant (just after the
//! gap), so windows always tile the time line without overlap.

use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;

/// Which kind of window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowKind {
    Minute,
    Slot,
    Day,
    Month,
}

impl WindowKind {
    /// The RateLimit member name (SPEC §8.1).
    pub fn name(self) -> &'static str {
        match self {
            WindowKind::Minute => "minute",
            WindowKind::Slot => "slot",
            WindowKind::Day => "day",
            WindowKind::Month => "month",
        }
    }
}

/// Which window, exactly: two windows are the same counter iff their ids are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowId {
    /// Minutes since the Unix epoch (UTC).
    Minute(i64),
    /// Local date and slot 1..=12.
    Slot(Date, u8),
    Day(Date),
    /// The local month's first day.
    Month(Date),
}

impl WindowId {
    /// The suffix of this window's Redis key: recognisable from its end whatever comes before it
    /// (an entry id may hold `:`), so no two windows of two entries share a key.
    pub fn key_suffix(&self) -> String {
        match self {
            WindowId::Minute(n) => format!("m:{n}"),
            WindowId::Slot(date, slot) => format!("s:{date}:T{slot}"),
            WindowId::Day(date) => format!("d:{date}"),
            WindowId::Month(first) => format!("mo:{}", &first.to_string()[..7]),
        }
    }
}

/// One window: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    pub id: WindowId,
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Window {
    pub fn of(kind: WindowKind, now: Timestamp, zone: &TimeZone) -> Window {
        match kind {
            WindowKind::Minute => Window::minute(now),
            WindowKind::Slot => Window::slot(now, zone),
            WindowKind::Day => Window::day(now, zone),
            WindowKind::Month => Window::month(now, zone),
        }
    }

    /// The UTC calendar minute holding `now`.
    pub fn minute(now: Timestamp) -> Window {
        let minute = now.as_second().div_euclid(60);
        let at = |m: i64| Timestamp::from_second(m.saturating_mul(60)).unwrap_or(now);
        Window {
            kind: WindowKind::Minute,
            id: WindowId::Minute(minute),
            start: at(minute),
            end: at(minute + 1),
        }
    }

    /// The local two-hour slot holding `now` (`T1` = 00:00–01:59 …).
    pub fn slot(now: Timestamp, zone: &TimeZone) -> Window {
        let local = zone.to_datetime(now);
        let date = local.date();
        let slot = (local.hour() / 2) as u8 + 1;
        let start = date.at(i8::try_from(2 * (slot - 1)).unwrap_or(0), 0, 0, 0);
        let end = if slot == 12 {
            next_day(date).at(0, 0, 0, 0)
        } else {
            date.at(i8::try_from(2 * slot).unwrap_or(0), 0, 0, 0)
        };
        Window {
            kind: WindowKind::Slot,
            id: WindowId::Slot(date, slot),
            start: instant(zone, start, now),
            end: instant(zone, end, now),
        }
    }

    /// The local date holding `now`.
    pub fn day(now: Timestamp, zone: &TimeZone) -> Window {
        let date = zone.to_datetime(now).date();
        Window {
            kind: WindowKind::Day,
            id: WindowId::Day(date),
            start: instant(zone, date.at(0, 0, 0, 0), now),
            end: instant(zone, next_day(date).at(0, 0, 0, 0), now),
        }
    }

    /// The local calendar month holding `now`.
    pub fn month(now: Timestamp, zone: &TimeZone) -> Window {
        let first = zone.to_datetime(now).date().first_of_month();
        let next = next_day(first.last_of_month());
        Window {
            kind: WindowKind::Month,
            id: WindowId::Month(first),
            start: instant(zone, first.at(0, 0, 0, 0), now),
            end: instant(zone, next.at(0, 0, 0, 0), now),
        }
    }

    /// Its length in seconds (`w` of the RateLimit fields).
    pub fn length_secs(&self) -> i64 {
        self.end.as_second() - self.start.as_second()
    }

    /// Whole seconds from `now` until the window ends, rounded up (`t`, `Retry-After`).
    pub fn secs_until_end(&self, now: Timestamp) -> u64 {
        let nanos = u128::try_from(self.end.as_nanosecond() - now.as_nanosecond()).unwrap_or(0);
        u64::try_from(nanos.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
    }
}

fn next_day(date: Date) -> Date {
    date.tomorrow().unwrap_or(date)
}

/// The instant of a local civil time (a time in a DST gap becomes the instant just after it).
fn instant(zone: &TimeZone, civil: DateTime, fallback: Timestamp) -> Timestamp {
    zone.to_timestamp(civil).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn minutes_are_utc_calendar_minutes() {
        let w = Window::minute(ts("2026-12-01T10:41:18.5Z"));
        assert_eq!(w.start, ts("2026-12-01T10:41:00Z"));
        assert_eq!(w.end, ts("2026-12-01T10:42:00Z"));
        assert_eq!(w.length_secs(), 60);
        assert_eq!(w.secs_until_end(ts("2026-12-01T10:41:18.5Z")), 42);
        assert_eq!(w.secs_until_end(ts("2026-12-01T10:41:59Z")), 1);
        assert_eq!(w.secs_until_end(ts("2026-12-01T10:43:00Z")), 0);
    }

    #[test]
    fn slot_and_day_boundaries_in_seoul() {
        let seoul = TimeZone::get("Asia/Seoul").unwrap();
        // 14:59:59 UTC is 23:59:59 in Seoul: the last second of T12.
        let w = Window::slot(ts("2026-11-27T14:59:59Z"), &seoul);
        assert_eq!(w.id, WindowId::Slot(jiff::civil::date(2026, 11, 27), 12));
        assert_eq!(w.end, ts("2026-11-27T15:00:00Z"));
        assert_eq!(w.secs_until_end(ts("2026-11-27T14:59:59Z")), 1);
        let next = Window::slot(ts("2026-11-27T15:00:00Z"), &seoul);
        assert_eq!(next.id, WindowId::Slot(jiff::civil::date(2026, 11, 28), 1));
        assert_eq!(next.start, w.end);
        let day = Window::day(ts("2026-11-27T15:00:00Z"), &seoul);
        assert_eq!(day.start, ts("2026-11-27T15:00:00Z"));
        assert_eq!(day.length_secs(), 86_400);
    }

    #[test]
    fn dst_spring_forward_in_new_york() {
        let ny = TimeZone::get("America/New_York").unwrap();
        // 2026-03-08: 02:00 EST does not exist; clocks jump to 03:00 EDT at 07:00 UTC.
        let t1 = Window::slot(ts("2026-03-08T06:30:00Z"), &ny);
        assert_eq!(t1.id, WindowId::Slot(jiff::civil::date(2026, 3, 8), 1));
        assert_eq!(t1.length_secs(), 7_200);
        let t2 = Window::slot(ts("2026-03-08T07:30:00Z"), &ny);
        assert_eq!(t2.id, WindowId::Slot(jiff::civil::date(2026, 3, 8), 2));
        assert_eq!(
            (t2.start, t2.end),
            (ts("2026-03-08T07:00:00Z"), ts("2026-03-08T08:00:00Z"))
        );
        assert_eq!(t2.length_secs(), 3_600);
        let day = Window::day(ts("2026-03-08T12:00:00Z"), &ny);
        assert_eq!(day.length_secs(), 23 * 3_600);
    }

    #[test]
    fn dst_fall_back_in_new_york() {
        let ny = TimeZone::get("America/New_York").unwrap();
        // 2026-11-01: 01:00–01:59 happens twice (EDT, then EST); T1 lasts three hours.
        let first = Window::slot(ts("2026-11-01T05:30:00Z"), &ny);
        let repeated = Window::slot(ts("2026-11-01T06:30:00Z"), &ny);
        assert_eq!(first, repeated);
        assert_eq!(
            (first.start, first.end),
            (ts("2026-11-01T04:00:00Z"), ts("2026-11-01T07:00:00Z"))
        );
        assert_eq!(first.length_secs(), 3 * 3_600);
        let t2 = Window::slot(ts("2026-11-01T07:00:00Z"), &ny);
        assert_eq!(t2.id, WindowId::Slot(jiff::civil::date(2026, 11, 1), 2));
        assert_eq!(
            Window::day(ts("2026-11-01T12:00:00Z"), &ny).length_secs(),
            25 * 3_600
        );
    }

    #[test]
    fn months_and_key_suffixes() {
        let utc = TimeZone::UTC;
        let m = Window::month(ts("2026-02-14T10:00:00Z"), &utc);
        assert_eq!(
            (m.start, m.end),
            (ts("2026-02-01T00:00:00Z"), ts("2026-03-01T00:00:00Z"))
        );
        assert_eq!(m.length_secs(), 28 * 86_400);
        assert_eq!(m.id.key_suffix(), "mo:2026-02");
        assert_eq!(
            Window::day(ts("2026-02-14T10:00:00Z"), &utc)
                .id
                .key_suffix(),
            "d:2026-02-14"
        );
        assert_eq!(
            Window::slot(ts("2026-02-14T10:00:00Z"), &utc)
                .id
                .key_suffix(),
            "s:2026-02-14:T6"
        );
        assert_eq!(
            Window::minute(ts("1970-01-01T00:02:30Z")).id.key_suffix(),
            "m:2"
        );
    }
}
