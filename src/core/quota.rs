//! Limit arithmetic, pure: which windows an entry's request limits apply to now, what remains, when
//! each resets, how large a lease to ask for, and the RateLimit fields and `Retry-After` of SPEC
//! §8.1 (draft-ietf-httpapi-ratelimit-headers-11 syntax: structured-field lists).
//!
//! The quota adapter (`crate::quota`) keeps the counts and talks to Redis; everything it decides
//! with is computed here, so windows, remaining counts and headers are unit-tested with a fixed
//! clock.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::limits::Limits;
use super::refusal::{RateLimitFields, RateLimitedBy};
use super::usage::Amount;
use super::window::{Window, WindowId, WindowKind};

/// Request windows, in the order their RateLimit members are written.
pub const REQUEST_KINDS: [WindowKind; 3] = [WindowKind::Minute, WindowKind::Slot, WindowKind::Day];

/// One request limit in force now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimit {
    pub window: Window,
    pub limit: u64,
}

/// The request limits of `limits` in force at `now`, by position in [`REQUEST_KINDS`]: a slot map
/// without the current slot has no slot limit now.
pub fn request_windows(
    limits: &Limits,
    now: Timestamp,
    zone: &TimeZone,
) -> [Option<WindowLimit>; 3] {
    let of = |kind| Window::of(kind, now, zone);
    let minute = limits.requests_per_minute.map(|limit| WindowLimit {
        window: of(WindowKind::Minute),
        limit,
    });
    let slot = limits.requests_per_slot.as_ref().and_then(|slots| {
        let window = of(WindowKind::Slot);
        let WindowId::Slot(_, index) = window.id else {
            return None;
        };
        slots.of(index).map(|limit| WindowLimit { window, limit })
    });
    let day = limits.requests_per_day.map(|limit| WindowLimit {
        window: of(WindowKind::Day),
        limit,
    });
    [minute, slot, day]
}

/// A window's standing after a decision: for the RateLimit fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The RateLimit member name (`minute` … `cost-month`).
    pub member: &'static str,
    /// `q`; for a cost, the limit rounded down to whole units of the price.
    pub limit: WindowLimit,
    /// What remains (never negative).
    pub remaining: u64,
    /// Whether this window refused the call.
    pub refused: bool,
}

/// `"minute";q=60;w=60, "slot";q=100;w=7200, "day";q=1000;w=86400`
pub fn policy_field(standings: &[Standing]) -> String {
    let mut out = String::with_capacity(32 * standings.len());
    for s in standings {
        member(&mut out, s.member, "q", structured_integer(s.limit.limit));
        parameter(
            &mut out,
            "w",
            s.limit.window.length_secs().max(1).unsigned_abs(),
        );
    }
    out
}

/// `"minute";r=59;t=42, "slot";r=97;t=3100, "day";r=905;t=50300`
pub fn state_field(standings: &[Standing], now: Timestamp) -> String {
    let mut out = String::with_capacity(32 * standings.len());
    for s in standings {
        member(&mut out, s.member, "r", structured_integer(s.remaining));
        parameter(&mut out, "t", s.limit.window.secs_until_end(now));
    }
    out
}

/// `, "name";key=value` (no separator first). Written by hand: these fields are built on every
/// answer for an entry with limits, and `format!` machinery was most of their cost.
fn member(out: &mut String, name: &str, key: &str, value: u64) {
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push('"');
    out.push_str(name);
    out.push('"');
    parameter(out, key, value);
}

/// `;key=value`
fn parameter(out: &mut String, key: &str, value: u64) {
    out.push(';');
    out.push_str(key);
    out.push('=');
    out.push_str(itoa::Buffer::new().format(value));
}

/// `Retry-After`: whole seconds until the latest end among the refusing windows, at least 1.
pub fn retry_after(standings: &[Standing], now: Timestamp) -> u64 {
    standings
        .iter()
        .filter(|s| s.refused)
        .map(|s| s.limit.window.secs_until_end(now))
        .max()
        .unwrap_or(1)
        .max(1)
}

/// What a consumer spent on an entry in the windows budgets count (SPEC §8.1, as recorded by §9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub tokens_day: u64,
    pub cost_day: Amount,
    pub cost_month: Amount,
}

/// The windows budgets count in at one moment: the local day and month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetWindows {
    pub day: Window,
    pub month: Window,
}

impl BudgetWindows {
    pub fn at(now: Timestamp, zone: &TimeZone) -> BudgetWindows {
        BudgetWindows {
            day: Window::of(WindowKind::Day, now, zone),
            month: Window::of(WindowKind::Month, now, zone),
        }
    }

    /// Whether these are still the windows at `now` (so they can be reused).
    pub fn hold(&self, now: Timestamp) -> bool {
        self.day.start <= now && now < self.day.end
    }

    /// The local date of the day window.
    pub fn date(&self) -> jiff::civil::Date {
        match self.day.id {
            WindowId::Day(date) | WindowId::Slot(date, _) | WindowId::Month(date) => date,
            WindowId::Minute(_) => jiff::civil::Date::MIN,
        }
    }
}

/// The token and cost budgets of `limits` and where `spent` leaves them, in member order
/// (`tokens-day`, `cost-day`, `cost-month`). A budget refuses once what was recorded reaches it;
/// for costs `q` and `r` are whole units of the price, rounded down.
pub fn budget_standings(limits: &Limits, spent: &Spent, windows: &BudgetWindows) -> Vec<Standing> {
    let mut out = Vec::with_capacity(3);
    if let Some(limit) = limits.tokens_per_day {
        out.push(Standing {
            member: "tokens-day",
            limit: WindowLimit {
                window: windows.day,
                limit,
            },
            remaining: limit.saturating_sub(spent.tokens_day),
            refused: spent.tokens_day >= limit,
        });
    }
    let costs = [
        (
            "cost-day",
            &limits.cost_per_day,
            spent.cost_day,
            windows.day,
        ),
        (
            "cost-month",
            &limits.cost_per_month,
            spent.cost_month,
            windows.month,
        ),
    ];
    for (member, limit, spent, window) in costs {
        let Some(limit) = limit else { continue };
        let limit = Amount::of(limit);
        out.push(Standing {
            member,
            limit: WindowLimit {
                window,
                limit: limit.whole_units(),
            },
            remaining: limit.saturating_sub(spent).whole_units(),
            refused: spent >= limit,
        });
    }
    out
}

impl RateLimitFields {
    pub fn of(standings: &[Standing], now: Timestamp) -> RateLimitFields {
        RateLimitFields {
            policy: policy_field(standings),
            state: state_field(standings, now),
        }
    }

    /// These fields with `more` members after them.
    pub fn extended(mut self, more: &[Standing], now: Timestamp) -> RateLimitFields {
        if more.is_empty() {
            return self;
        }
        let sep = |s: &String| if s.is_empty() { "" } else { ", " };
        self.policy = format!("{}{}{}", self.policy, sep(&self.policy), policy_field(more));
        self.state = format!(
            "{}{}{}",
            self.state,
            sep(&self.state),
            state_field(more, now)
        );
        self
    }
}

impl RateLimitedBy {
    /// A 429 for these standings: `Retry-After` from those that refused.
    pub fn of(standings: &[Standing], now: Timestamp) -> RateLimitedBy {
        RateLimitedBy {
            retry_after: retry_after(standings, now),
            fields: RateLimitFields::of(standings, now),
        }
    }
}

/// Structured-field integers have at most 15 digits.
fn structured_integer(n: u64) -> u64 {
    n.min(999_999_999_999_999)
}

/// How much quota to reserve from the shared store in one lease: a sixteenth of the limit (so an
/// entry with a limit of 1000 costs at most one round trip per 62 calls), or a second of this
/// replica's recent rate when that is more; never more than half of what is left unreserved, so
/// leases shrink near the end and other replicas still find quota; at least one call.
pub fn lease_size(limit: u64, unreserved: u64, calls_per_second: u64) -> u64 {
    let wanted = (limit / 16).max(calls_per_second);
    wanted.min(unreserved / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::SlotLimit;
    use crate::core::model::SLOTS;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn standings(limits: &Limits, now: Timestamp, zone: &TimeZone, used: u64) -> Vec<Standing> {
        request_windows(limits, now, zone)
            .into_iter()
            .flatten()
            .map(|limit| Standing {
                member: limit.window.kind.name(),
                remaining: limit.limit.saturating_sub(used),
                refused: used >= limit.limit,
                limit,
            })
            .collect()
    }

    #[test]
    fn the_spec_example_fields() {
        let limits = Limits {
            requests_per_minute: Some(60),
            requests_per_slot: Some(SlotLimit::Every(100)),
            requests_per_day: Some(1000),
            ..Limits::default()
        };
        // 10:59:18 UTC: 42 s left in the minute, 3642 s in slot T6, 46842 s in the day.
        let now = ts("2026-12-01T10:59:18Z");
        let s = standings(&limits, now, &TimeZone::UTC, 1);
        assert_eq!(
            policy_field(&s),
            r#""minute";q=60;w=60, "slot";q=100;w=7200, "day";q=1000;w=86400"#
        );
        assert_eq!(
            state_field(&s, now),
            r#""minute";r=59;t=42, "slot";r=99;t=3642, "day";r=999;t=46842"#
        );
    }

    #[test]
    fn a_slot_map_applies_only_in_its_slots() {
        let mut slots = [None; SLOTS];
        slots[0] = Some(5);
        let limits = Limits {
            requests_per_slot: Some(SlotLimit::Some(slots)),
            ..Limits::default()
        };
        let utc = TimeZone::UTC;
        let in_t1 = request_windows(&limits, ts("2026-12-01T01:00:00Z"), &utc);
        assert_eq!(in_t1[1].map(|w| w.limit), Some(5));
        let in_t2 = request_windows(&limits, ts("2026-12-01T02:00:00Z"), &utc);
        assert!(in_t2.iter().all(Option::is_none));
    }

    #[test]
    fn dst_days_give_the_windows_their_real_length() {
        let ny = TimeZone::get("America/New_York").unwrap();
        let limits = Limits {
            requests_per_slot: Some(SlotLimit::Every(10)),
            requests_per_day: Some(100),
            ..Limits::default()
        };
        let now = ts("2026-03-08T07:30:00Z");
        let s = standings(&limits, now, &ny, 0);
        assert_eq!(
            policy_field(&s),
            r#""slot";q=10;w=3600, "day";q=100;w=82800"#
        );
        assert_eq!(
            state_field(&s, now),
            r#""slot";r=10;t=1800, "day";r=100;t=73800"#
        );
    }

    #[test]
    fn retry_after_is_the_latest_refusing_end() {
        let limits = Limits {
            requests_per_minute: Some(1),
            requests_per_day: Some(1),
            ..Limits::default()
        };
        let now = ts("2026-12-01T23:59:30Z");
        let s = standings(&limits, now, &TimeZone::UTC, 1);
        assert_eq!(retry_after(&s, now), 30);
        let mut only_minute = s.clone();
        only_minute[1].refused = false;
        assert_eq!(retry_after(&only_minute, ts("2026-12-01T23:59:59.9Z")), 1);
        // Zero refuses the first call.
        let zero = Limits {
            requests_per_day: Some(0),
            ..Limits::default()
        };
        let s = standings(&zero, now, &TimeZone::UTC, 0);
        assert!(s[0].refused);
        assert_eq!(s[0].remaining, 0);
    }

    #[test]
    fn leases_shrink_near_the_end() {
        assert_eq!(lease_size(1000, 1000, 0), 62);
        assert_eq!(lease_size(1000, 100, 0), 50);
        assert_eq!(lease_size(1000, 3, 0), 1);
        assert_eq!(lease_size(1000, 0, 0), 1);
        assert_eq!(lease_size(10_000_000, 10_000_000, 50_000), 625_000);
        assert_eq!(lease_size(10, 10, 0), 1);
        assert_eq!(lease_size(1_000_000, 1_000_000, 900_000), 500_000);
    }

    #[test]
    fn huge_limits_stay_structured_field_integers() {
        let limits = Limits {
            requests_per_day: Some(u64::MAX),
            ..Limits::default()
        };
        let s = standings(&limits, ts("2026-12-01T00:00:00Z"), &TimeZone::UTC, 0);
        assert!(
            policy_field(&s).contains("q=999999999999999;"),
            "{}",
            policy_field(&s)
        );
    }
}
