//! An entry's `limits` (SPEC §8.1): request quotas per UTC minute, per slot and per local day, and
//! the token and cost budgets that usage records are checked against.
//!
//! Only the shape lives here; the seed parser fills it in (every problem with its field path), the
//! quota adapter enforces the request limits, and `core::quota` does the arithmetic of windows,
//! remaining counts and headers.

use super::decimal::Decimal;
use super::model::SLOTS;

/// `requests_per_slot`: one number for every slot, or numbers for some of `T1`..`T12`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotLimit {
    Every(u64),
    /// Index 0 is `T1`; `None` is unlimited.
    Some([Option<u64>; SLOTS]),
}

impl SlotLimit {
    /// The limit of slot `slot` (1-based), if it has one.
    pub fn of(&self, slot: u8) -> Option<u64> {
        match self {
            SlotLimit::Every(n) => Some(*n),
            SlotLimit::Some(slots) => slots
                .get(usize::from(slot).checked_sub(1)?)
                .copied()
                .flatten(),
        }
    }
}

/// Every field is optional; an absent one means no limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub requests_per_slot: Option<SlotLimit>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub cost_per_day: Option<Decimal>,
    pub cost_per_month: Option<Decimal>,
}

impl Limits {
    /// Whether any request limit (minute, slot, day) is set: only those cost anything per call.
    pub fn has_request_limits(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.requests_per_slot.is_some()
            || self.requests_per_day.is_some()
    }

    /// Whether any token or cost budget is set: those are checked against recorded usage (§9).
    pub fn has_budgets(&self) -> bool {
        self.tokens_per_day.is_some()
            || self.cost_per_day.is_some()
            || self.cost_per_month.is_some()
    }

    /// The limits as the JSON object of the seed's shape (for records and `/api/user-metadata`).
    pub fn write_json(&self, out: &mut String) {
        let mut fields: Vec<String> = Vec::new();
        let mut int = |name: &str, value: Option<u64>| {
            if let Some(v) = value {
                fields.push(format!("\"{name}\":{v}"));
            }
        };
        int("requests_per_minute", self.requests_per_minute);
        match &self.requests_per_slot {
            Some(SlotLimit::Every(n)) => fields.push(format!("\"requests_per_slot\":{n}")),
            Some(SlotLimit::Some(slots)) => {
                let members: Vec<String> = slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| n.map(|n| format!("\"T{}\":{n}", i + 1)))
                    .collect();
                fields.push(format!("\"requests_per_slot\":{{{}}}", members.join(",")));
            }
            None => {}
        }
        let mut int = |name: &str, value: Option<u64>| {
            if let Some(v) = value {
                fields.push(format!("\"{name}\":{v}"));
            }
        };
        int("requests_per_day", self.requests_per_day);
        int("tokens_per_day", self.tokens_per_day);
        for (name, value) in [
            ("cost_per_day", &self.cost_per_day),
            ("cost_per_month", &self.cost_per_month),
        ] {
            if let Some(v) = value {
                fields.push(format!("\"{name}\":{}", v.to_plain()));
            }
        }
        out.push('{');
        out.push_str(&fields.join(","));
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_limits_and_json() {
        let mut some = [None; SLOTS];
        some[6] = Some(5);
        let limits = Limits {
            requests_per_minute: Some(60),
            requests_per_slot: Some(SlotLimit::Some(some)),
            cost_per_day: Some(Decimal::parse("0.5").unwrap()),
            ..Limits::default()
        };
        assert_eq!(limits.requests_per_slot.as_ref().unwrap().of(7), Some(5));
        assert_eq!(limits.requests_per_slot.as_ref().unwrap().of(6), None);
        assert_eq!(SlotLimit::Every(3).of(12), Some(3));
        assert!(limits.has_request_limits());
        let mut out = String::new();
        limits.write_json(&mut out);
        assert_eq!(
            out,
            r#"{"requests_per_minute":60,"requests_per_slot":{"T7":5},"cost_per_day":0.5}"#
        );
        assert!(!Limits::default().has_request_limits());
    }
}
