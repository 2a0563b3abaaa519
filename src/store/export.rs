//! The billing export's reads (SPEC §10 `GET /admin/usage`): which consumers have anything in a
//! month, and each one's month, per entry and day, as Redis holds it.
//!
//! Consumers are found by SCAN over the month's usage sums (`uma:usage-month:{…}:<entry>:<YYYY-MM>`,
//! which also name the entry) and the TDL day indexes (`uma:tdl-entries:{…}:<YYYY-MM-DD>`), never by
//! asking every seed consumer: with 100k consumers that would be millions of reads for a month in
//! which a few hundred used anything. Each key found is parsed back strictly and must round-trip
//! through [`keys`], so a username that happens to hold the month's text never adds a stranger.
//!
//! A consumer's month is then read by one script ([`EXPORT_MONTH`]) — every day's usage index and
//! TDL index, the day sums and counters they list, the month sums, and this process's TDL ledger —
//! in one atomic step, so the days and the total of one consumer always describe the same moment.
//! The scripts of many consumers go in one pipeline; a consumer whose keys cannot be read (a key
//! of the wrong type) is that consumer's error, never the others'.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use jiff::civil::Date;
use redis::{Script, Value};

use super::scripts::Lua;
use super::{Patience, RedisStore, StoreError, bytes, keys, stored_count};
use crate::core::model::SLOTS;
use crate::core::usage::{Amount, PICO, Totals};

/// Keys each SCAN call looks at (its `COUNT`).
const SCAN_COUNT: u32 = 1000;

/// Consumers with usage sums or TDL counts in one month, as found by SCAN.
#[derive(Debug, Default)]
pub struct MonthConsumers {
    /// Username → the entry ids that have month sums (an entry with calls only is found by its
    /// day index when the month is read).
    pub consumers: BTreeMap<String, BTreeSet<String>>,
    /// Why the scan stopped before the end, if it did: `consumers` is then what it found so far.
    pub error: Option<StoreError>,
}

/// One consumer's month as Redis holds it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredMonth {
    /// Usage sums per (entry, local date) listed in that day's usage index (`requests` 0).
    pub usage_days: Vec<(String, Date, Totals)>,
    /// Allowed calls (T1 + … + T12) per (entry, local date) listed in that day's TDL index.
    pub request_days: Vec<(String, Date, u64)>,
    /// The month sums of every entry found (`requests` 0).
    pub months: Vec<(String, Totals)>,
    /// This process's TDL ledger for the consumer: its shares up to this sequence are in the
    /// counts above.
    pub tdl_applied: u64,
}

/// Reads one consumer's month in one atomic step.
///
/// KEYS[1] = this process's TDL ledger for the consumer; KEYS[2..N+1] = the usage index of each
/// day of the month; KEYS[N+2..2N+1] = the TDL index of each day. ARGV[1..4] = day-sum prefix,
/// counter prefix, month-sum prefix and suffix (around an entry id; all under the consumer's hash
/// tag); ARGV[5..4+2N] = each day's day-sum suffix and counter suffix; then entry ids known to
/// have month sums. Replies `[ledger, (usage day, tdl day) × N, months]`, where a usage day is
/// `[id, [d:i, d:o, d:c, d:C], …]`, a TDL day `[id, [T1..T12], …]` and months `[id, [i, o, c, C], …]`
/// for every entry seen. A key of the wrong type raises: nothing is written, so nothing is half done.
pub static EXPORT_MONTH: Lua = Lua {
    source: EXPORT_MONTH_SOURCE,
    script: LazyLock::new(|| Script::new(EXPORT_MONTH_SOURCE)),
};
const EXPORT_MONTH_SOURCE: &str = r"
local n = (#KEYS - 1) / 2
local months, seen = {}, {}
local function want(id)
  if not seen[id] then
    seen[id] = true
    months[#months + 1] = id
  end
end
for i = 5 + 2 * n, #ARGV do want(ARGV[i]) end
local out = {redis.call('GET', KEYS[1])}
for d = 1, n do
  local usage, tdl = {}, {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1 + d])) do
    want(id)
    usage[#usage + 1] = id
    usage[#usage + 1] = redis.call('HMGET', ARGV[1] .. id .. ARGV[3 + 2 * d], 'd:i', 'd:o', 'd:c', 'd:C')
  end
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1 + n + d])) do
    tdl[#tdl + 1] = id
    tdl[#tdl + 1] = redis.call('HMGET', ARGV[2] .. id .. ARGV[4 + 2 * d],
      'T1', 'T2', 'T3', 'T4', 'T5', 'T6', 'T7', 'T8', 'T9', 'T10', 'T11', 'T12')
  end
  out[#out + 1] = usage
  out[#out + 1] = tdl
end
local m = {}
for _, id in ipairs(months) do
  m[#m + 1] = id
  m[#m + 1] = redis.call('HMGET', ARGV[3] .. id .. ARGV[4], 'i', 'o', 'c', 'C')
end
out[#out + 1] = m
return out
";

impl RedisStore {
    /// Every consumer with usage sums or TDL counts in the month of `month` (SCAN, `COUNT 1000`).
    /// A failed SCAN call ends the scan: what was found until then comes back with the error.
    pub async fn month_consumers(&self, month: Date) -> MonthConsumers {
        let mut found = MonthConsumers::default();
        let month = month.first_of_month();
        let usage = self
            .scan(&keys::usage_month("*", "*", month), |key| {
                if let Some((user, entry)) = usage_month_key(key, month) {
                    found
                        .consumers
                        .entry(user.to_owned())
                        .or_default()
                        .insert(entry.to_owned());
                }
            })
            .await;
        if let Err(error) = usage {
            found.error = Some(error);
            return found;
        }
        let tdl = self
            .scan(&tdl_index_pattern(month), |key| {
                if let Some(user) = tdl_index_key(key, month) {
                    found.consumers.entry(user.to_owned()).or_default();
                }
            })
            .await;
        found.error = tdl.err();
        found
    }

    /// Each consumer's month (with the entries known to have month sums), one script each, in one
    /// round trip; `instance` names this process's TDL ledger. Each consumer has its own result.
    pub async fn read_months(
        &self,
        consumers: &[(&str, Vec<&str>)],
        month: Date,
        instance: &str,
    ) -> Result<Vec<Result<StoredMonth, StoreError>>, StoreError> {
        let days = month_days(month);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (username, entries) in consumers {
            let (names, args) = export_args(username, entries, &days, instance);
            super::evalsha(
                &mut pipe,
                &EXPORT_MONTH,
                &names.iter().map(String::as_str).collect::<Vec<_>>(),
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        let values = self
            .query_scripts_within(Patience::Bulk, &pipe, &[&EXPORT_MONTH])
            .await?;
        if values.len() != consumers.len() {
            return Err(StoreError::Rejected(format!(
                "{} replies for {} export scripts",
                values.len(),
                consumers.len()
            )));
        }
        let months: Vec<Result<StoredMonth, StoreError>> = values
            .into_iter()
            .map(|value| month_of(value, &days))
            .collect();
        let failed = months.iter().filter(|m| m.is_err()).count();
        self.errors.increment(failed as u64);
        Ok(months)
    }

    /// SCANs the whole keyspace for `pattern`, handing each key found (as text) to `found`.
    async fn scan(&self, pattern: &str, mut found: impl FnMut(&str)) -> Result<(), StoreError> {
        let mut cursor = String::from("0");
        loop {
            let (at, pattern_arg) = (cursor.clone(), pattern.to_owned());
            let reply = self
                .run_within(Patience::Bulk, |mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(at)
                        .arg("MATCH")
                        .arg(pattern_arg)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await?;
            let (next, keys) = scan_reply(&reply)?;
            for key in keys {
                // Keys this service writes are text; anything else is not one of them.
                if let Ok(key) = std::str::from_utf8(key) {
                    found(key);
                }
            }
            if next == "0" {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// Every local date of the month of `month`, in order.
fn month_days(month: Date) -> Vec<Date> {
    let first = month.first_of_month();
    let last = first.last_of_month();
    let mut days = Vec::with_capacity(31);
    let mut day = first;
    while day <= last {
        days.push(day);
        match day.tomorrow() {
            Ok(next) => day = next,
            Err(_) => break,
        }
    }
    days
}

/// The SCAN pattern of a month's TDL day indexes: `uma:tdl-entries:{*}:<YYYY-MM>-??`.
fn tdl_index_pattern(month: Date) -> String {
    let index = keys::tdl_entries("*", month.first_of_month());
    // The date's last two characters (the day) become `??`.
    format!("{}??", &index[..index.len() - 2])
}

/// `uma:usage-month:{<user>}:<entry>:<YYYY-MM>` of `month` → (user, entry).
fn usage_month_key(key: &str, month: Date) -> Option<(&str, &str)> {
    let user = hash_tag(key.strip_prefix("uma:usage-month:{")?)?;
    let (prefix, suffix) = keys::usage_month_affixes(user, month);
    let entry = key.strip_prefix(prefix.as_str())?.strip_suffix(&suffix)?;
    (!entry.is_empty() && keys::usage_month(user, entry, month) == key).then_some((user, entry))
}

/// `uma:tdl-entries:{<user>}:<YYYY-MM-DD>` of a date in `month` → user.
fn tdl_index_key(key: &str, month: Date) -> Option<&str> {
    let user = hash_tag(key.strip_prefix("uma:tdl-entries:{")?)?;
    let date: Date = key.rsplit(':').next()?.parse().ok()?;
    (date.first_of_month() == month.first_of_month() && keys::tdl_entries(user, date) == key)
        .then_some(user)
}

/// The username of a key after its `{`: up to the first `}` (usernames never hold braces).
fn hash_tag(rest: &str) -> Option<&str> {
    let (user, _) = rest.split_once('}')?;
    (!user.is_empty()).then_some(user)
}

/// Keys and arguments of [`EXPORT_MONTH`] for one consumer.
fn export_args(
    username: &str,
    entries: &[&str],
    days: &[Date],
    instance: &str,
) -> (Vec<String>, Vec<String>) {
    let first = days.first().copied().unwrap_or_default();
    let mut names = Vec::with_capacity(1 + 2 * days.len());
    names.push(keys::tdl_applied(username, instance));
    names.extend(days.iter().map(|d| keys::usage_entries(username, *d)));
    names.extend(days.iter().map(|d| keys::tdl_entries(username, *d)));
    let (day_prefix, _) = keys::usage_day_affixes(username, first);
    let (tdl_prefix, _) = keys::tdl_counter_affixes(username, first);
    let (month_prefix, month_suffix) = keys::usage_month_affixes(username, first);
    let mut args = vec![day_prefix, tdl_prefix, month_prefix, month_suffix];
    for day in days {
        args.push(keys::usage_day_affixes(username, *day).1);
        args.push(keys::tdl_counter_affixes(username, *day).1);
    }
    args.extend(entries.iter().map(|e| (*e).to_owned()));
    (names, args)
}

/// A SCAN reply: the next cursor and the keys of this step.
fn scan_reply(reply: &Value) -> Result<(String, Vec<&[u8]>), StoreError> {
    let bad = || StoreError::Rejected(format!("SCAN answered {reply:?}"));
    let Value::Array(parts) = reply else {
        return Err(bad());
    };
    let [cursor, Value::Array(keys)] = parts.as_slice() else {
        return Err(bad());
    };
    let cursor = bytes(cursor)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(bad)?
        .to_owned();
    Ok((cursor, keys.iter().filter_map(bytes).collect()))
}

/// The reply of [`EXPORT_MONTH`] for the month of `days`.
fn month_of(reply: Value, days: &[Date]) -> Result<StoredMonth, StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(StoreError::Rejected(e.to_string())),
        other => {
            return Err(StoreError::Rejected(format!(
                "the month export answered {other:?}"
            )));
        }
    };
    if items.len() != 2 + 2 * days.len() {
        return Err(StoreError::Rejected(format!(
            "the month export answered {} parts for {} days",
            items.len(),
            days.len()
        )));
    }
    let mut items = items.into_iter();
    let mut month = StoredMonth {
        tdl_applied: stored_count(&items.next().unwrap_or(Value::Nil))?,
        ..StoredMonth::default()
    };
    for day in days {
        let usage = items.next().unwrap_or(Value::Nil);
        for (id, fields) in pairs(&usage)? {
            month.usage_days.push((id, *day, totals(fields)?));
        }
        let tdl = items.next().unwrap_or(Value::Nil);
        for (id, fields) in pairs(&tdl)? {
            let slots = list(fields, SLOTS)?;
            let mut calls = 0u64;
            for slot in slots {
                calls = calls.saturating_add(stored_count(slot)?);
            }
            month.request_days.push((id, *day, calls));
        }
    }
    for (id, fields) in pairs(&items.next().unwrap_or(Value::Nil))? {
        month.months.push((id, totals(fields)?));
    }
    Ok(month)
}

/// `[id, value, id, value, …]` as (id, value) pairs.
fn pairs(value: &Value) -> Result<Vec<(String, &Value)>, StoreError> {
    let Value::Array(items) = value else {
        return Err(StoreError::Rejected(format!(
            "expected a list, got {value:?}"
        )));
    };
    if items.len() % 2 != 0 {
        return Err(StoreError::Rejected("an odd list of pairs".into()));
    }
    items
        .chunks(2)
        .map(|pair| {
            let id = bytes(&pair[0])
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Rejected("an entry id that is not text".into()))?;
            Ok((id.to_owned(), &pair[1]))
        })
        .collect()
}

/// A list of exactly `len` values.
fn list(value: &Value, len: usize) -> Result<&[Value], StoreError> {
    match value {
        Value::Array(items) if items.len() == len => Ok(items),
        other => Err(StoreError::Rejected(format!(
            "expected {len} fields, got {other:?}"
        ))),
    }
}

/// `[input, output, cost in 10⁻¹², whole cost units]` as stored.
fn totals(value: &Value) -> Result<Totals, StoreError> {
    let [input, output, pico, whole] = list(value, 4)? else {
        return Err(StoreError::Rejected("expected 4 fields".into()));
    };
    Ok(Totals {
        requests: 0,
        input: stored_count(input)?,
        output: stored_count(output)?,
        // Whole units and the rest in 10⁻¹² (below 10¹² after every write; any u64 fits anyway).
        cost: Amount(u128::from(stored_count(whole)?) * PICO + u128::from(stored_count(pico)?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn date(s: &str) -> Date {
        s.parse().unwrap()
    }

    #[test]
    fn scanned_keys_are_parsed_back_strictly() {
        let dec = date("2026-12-01");
        assert_eq!(
            keys::usage_month("*", "*", dec),
            "uma:usage-month:{*}:*:2026-12"
        );
        assert_eq!(tdl_index_pattern(dec), "uma:tdl-entries:{*}:2026-12-??");
        let key = keys::usage_month("a,b", "e:1", dec);
        assert_eq!(usage_month_key(&key, dec), Some(("a,b", "e:1")));
        // Another month, a username that holds the month's text, a wrong prefix: not ours.
        let nov = keys::usage_month("u", "e", date("2026-11-03"));
        assert_eq!(usage_month_key(&nov, dec), None);
        assert_eq!(
            usage_month_key("uma:usage-month:{u:2026-12}:e:2026-11", dec),
            None
        );
        assert_eq!(usage_month_key("uma:usage-month:{u}::2026-12", dec), None);
        assert_eq!(usage_month_key("uma:usage:{u}:e:2026-12", dec), None);
        let index = keys::tdl_entries("u:2026-12-01", date("2026-12-31"));
        assert_eq!(tdl_index_key(&index, dec), Some("u:2026-12-01"));
        let other = keys::tdl_entries("u:2026-12-01", date("2026-11-30"));
        assert_eq!(tdl_index_key(&other, dec), None);
        assert_eq!(tdl_index_key("uma:tdl-entries:{}:2026-12-01", dec), None);
        assert_eq!(tdl_index_key("uma:tdl-entries:{u}:2026-12-32", dec), None);
    }

    #[test]
    fn the_script_builds_the_keys_of_the_layout() {
        let days = month_days(date("2027-02-14"));
        assert_eq!(days.len(), 28);
        assert_eq!(days[0], date("2027-02-01"));
        let (keys, args) = export_args("u", &["e"], &days, "i1");
        assert_eq!(keys.len(), 1 + 2 * 28);
        assert_eq!(keys[0], keys::tdl_applied("u", "i1"));
        assert_eq!(keys[28], keys::usage_entries("u", date("2027-02-28")));
        assert_eq!(keys[29], keys::tdl_entries("u", days[0]));
        // What the script puts together is the key the writers use.
        let d = 3; // the third day (1-based in the script)
        assert_eq!(
            format!("{}e{}", args[0], args[3 + 2 * d - 1]),
            keys::usage_day("u", "e", days[d - 1])
        );
        assert_eq!(
            format!("{}e{}", args[1], args[4 + 2 * d - 1]),
            keys::tdl_counter("u", "e", days[d - 1])
        );
        assert_eq!(
            format!("{}e{}", args[2], args[3]),
            keys::usage_month("u", "e", days[0])
        );
        assert_eq!(args.last().map(String::as_str), Some("e"));
        assert_eq!(args.len(), 4 + 2 * 28 + 1);
    }

    #[test]
    fn month_replies_are_read_exactly_and_strictly() {
        let days = [date("2026-12-01"), date("2026-12-02")];
        let sums = |v: [&str; 4]| Value::Array(v.iter().map(|s| bulk(s)).collect());
        let mut slots = vec![Value::Nil; SLOTS];
        slots[4] = bulk("3");
        slots[11] = bulk("2");
        let reply = Value::Array(vec![
            bulk("7"),
            Value::Array(vec![bulk("e"), sums(["14", "21", "4900000", "0"])]),
            Value::Array(vec![bulk("e"), Value::Array(slots.clone())]),
            Value::Array(vec![]),
            Value::Array(vec![bulk("f"), Value::Array(vec![Value::Nil; SLOTS])]),
            Value::Array(vec![bulk("e"), sums(["14", "21", "5", "2"])]),
        ]);
        let month = month_of(reply, &days).unwrap();
        assert_eq!(month.tdl_applied, 7);
        assert_eq!(month.usage_days.len(), 1);
        let (id, day, t) = &month.usage_days[0];
        assert_eq!(
            (id.as_str(), *day, t.input, t.output),
            ("e", days[0], 14, 21)
        );
        assert_eq!(t.cost.plain(), "0.0000049");
        assert_eq!(
            month.request_days,
            vec![("e".into(), days[0], 5), ("f".into(), days[1], 0)]
        );
        assert_eq!(month.months[0].1.cost.plain(), "2.000000000005");
        // A field that is not a count, or a reply of the wrong shape, fails the consumer.
        slots[0] = bulk("x");
        let bad = Value::Array(vec![
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![bulk("e"), Value::Array(slots)]),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Array(vec![]),
        ]);
        assert!(month_of(bad, &days).is_err());
        assert!(month_of(Value::Array(vec![Value::Nil]), &days).is_err());
        assert!(month_of(Value::Okay, &days).is_err());
    }

    #[test]
    fn scan_replies() {
        let reply = Value::Array(vec![bulk("17"), Value::Array(vec![bulk("k1"), bulk("k2")])]);
        let (cursor, keys) = scan_reply(&reply).unwrap();
        assert_eq!(cursor, "17");
        assert_eq!(keys, [b"k1".as_slice(), b"k2".as_slice()]);
        assert!(scan_reply(&Value::Array(vec![bulk("0")])).is_err());
    }
}
