//! Usage records in Redis (SPEC §9): one atomic script per consumer that drops the ids it has seen
//! and adds the rest to the slot, day and month sums, and the reads budgets and `/api/usage` need.
//!
//! Costs are kept in two integer fields per sum, whole units (`…:C`) and the rest in 10⁻¹² (`…:c`,
//! always below 10¹² after a write): a single field of 10⁻¹² units would overflow Redis's 64-bit
//! integers at 9.2 million units, and the SPEC wants sums exact up to 10¹⁵. The script adds a
//! batch's small numbers in Lua (exact: each sum stays below 2⁵³) and whole units as strings.

use jiff::civil::Date;
use redis::Value;

use super::keys;
use super::scripts;
use super::{RedisStore, StoreError, bytes, stored_count};
use crate::core::model::SLOTS;
use crate::core::usage::{Amount, PICO, Totals};

/// One record as the script takes it.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// The request id's digest: what the seen-id set holds.
    pub digest: [u8; 16],
    pub entry: String,
    pub date: Date,
    /// 1..=12.
    pub slot: u8,
    /// The record's time or its arrival, whichever is later (ms): its id is kept at least
    /// `dedup` past both.
    pub seen_at_ms: i64,
    pub totals: Totals,
}

/// One consumer's records under one batch id: a retry sends the same batch under the same id and
/// gets the first answer back.
#[derive(Debug, Clone)]
pub struct UsageBatch {
    pub username: String,
    pub batch_id: String,
    pub records: Vec<StoredRecord>,
}

/// Lifetimes of what the script writes.
#[derive(Debug, Clone, Copy)]
pub struct UsageTtls {
    /// Seen ids older than this (ms before now) are forgotten.
    pub dedup_ms: i64,
    pub day_secs: u64,
    pub month_secs: u64,
    pub ledger_secs: u64,
}

/// What the script did with one batch: per record, applied (`true`) or a duplicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    Applied(Vec<bool>),
    /// A key has the wrong type: nothing was written.
    Refused {
        key: String,
        reason: String,
    },
    /// Whether any of it was written is unknown; retry it as it is.
    Failed(String),
}

/// Sums of one entry on one date: per slot and the day's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDay {
    pub slots: [Totals; SLOTS],
    pub day: Totals,
    pub month: Totals,
}

/// Budget totals of one (consumer, entry): today's tokens and cost, this month's cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredSpent {
    pub tokens_day: u64,
    pub cost_day: Amount,
    pub cost_month: Amount,
}

impl RedisStore {
    /// Applies each consumer's batch exactly once (one script each, pipelined).
    pub async fn apply_usage(
        &self,
        batches: &[UsageBatch],
        now_ms: i64,
        ttls: UsageTtls,
    ) -> Result<Vec<BatchOutcome>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for batch in batches {
            let (keys, args) = apply_args(batch, now_ms, ttls);
            pipe.cmd("EVALSHA")
                .arg(scripts::APPLY_USAGE.sha())
                .arg(keys.len())
                .arg(&keys)
                .arg(&args);
        }
        let values = self
            .query_scripts_within(super::Patience::Bulk, &pipe, &[&scripts::APPLY_USAGE])
            .await?;
        if values.len() != batches.len() {
            return Err(StoreError::Rejected(format!(
                "{} replies for {} usage scripts",
                values.len(),
                batches.len()
            )));
        }
        let outcomes: Vec<BatchOutcome> = values
            .into_iter()
            .zip(batches)
            .map(|(value, batch)| batch_outcome(value, batch.records.len()))
            .collect();
        let failed = outcomes
            .iter()
            .filter(|o| !matches!(o, BatchOutcome::Applied(_)))
            .count();
        self.errors.increment(failed as u64);
        Ok(outcomes)
    }

    /// Budget totals of several (consumer, entry) pairs for `date` and its month, in one round trip.
    pub async fn usage_spent(
        &self,
        pairs: &[(&str, &str)],
        date: Date,
    ) -> Result<Vec<Result<StoredSpent, StoreError>>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (username, entry) in pairs {
            pipe.cmd("HMGET")
                .arg(keys::usage_day(username, entry, date))
                .arg(&["d:i", "d:o", "d:c", "d:C"]);
            pipe.cmd("HMGET")
                .arg(keys::usage_month(username, entry, date))
                .arg(&["c", "C"]);
        }
        let values: Vec<Value> = self
            .run(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let mut values = values.into_iter();
        let mut out = Vec::with_capacity(pairs.len());
        for _ in pairs {
            let day = values.next().unwrap_or(Value::Nil);
            let month = values.next().unwrap_or(Value::Nil);
            out.push(spent_of(day, month));
        }
        Ok(out)
    }

    /// A consumer's sums for `date` (and its month): the given entries, then every other entry with
    /// records that day, read in one atomic step.
    pub async fn usage_report(
        &self,
        username: &str,
        date: Date,
        known: &[&str],
    ) -> Result<Vec<(String, StoredDay)>, StoreError> {
        let index = keys::usage_entries(username, date);
        let (day_prefix, day_suffix) = keys::usage_day_affixes(username, date);
        let (month_prefix, month_suffix) = keys::usage_month_affixes(username, date);
        let mut args = vec![
            day_prefix.as_str(),
            day_suffix.as_str(),
            month_prefix.as_str(),
            month_suffix.as_str(),
        ];
        args.extend_from_slice(known);
        let reply = self
            .script(&scripts::READ_USAGE_SUMS, &[&index], &args)
            .await?;
        let report = report_of(reply);
        if report.is_err() {
            self.errors.increment(1);
        }
        report
    }
}

/// Keys and arguments of [`scripts::APPLY_USAGE`] for one batch.
fn apply_args(batch: &UsageBatch, now_ms: i64, ttls: UsageTtls) -> (Vec<String>, Vec<Vec<u8>>) {
    let user = &batch.username;
    let mut keys = vec![
        keys::usage_seen(user),
        keys::usage_batch(user, &batch.batch_id),
    ];
    let mut kinds = String::new();
    let mut index_of = |keys: &mut Vec<String>, key: String, kind: char| -> usize {
        match keys.iter().skip(2).position(|k| *k == key) {
            Some(i) => i + 3,
            None => {
                keys.push(key);
                kinds.push(kind);
                keys.len()
            }
        }
    };
    let mut records = Vec::with_capacity(batch.records.len() * 11);
    for r in &batch.records {
        let day = index_of(&mut keys, keys::usage_day(user, &r.entry, r.date), 'd');
        let month = index_of(&mut keys, keys::usage_month(user, &r.entry, r.date), 'm');
        let index = index_of(&mut keys, keys::usage_entries(user, r.date), 's');
        let (whole, pico) = r.totals.cost.split();
        records.push(r.digest.to_vec());
        for field in [
            r.seen_at_ms.to_string(),
            day.to_string(),
            month.to_string(),
            index.to_string(),
            r.entry.clone(),
            format!("T{}", r.slot),
            r.totals.input.to_string(),
            r.totals.output.to_string(),
            pico.to_string(),
            whole.to_string(),
        ] {
            records.push(field.into_bytes());
        }
    }
    let mut args: Vec<Vec<u8>> = [
        now_ms.to_string(),
        now_ms.saturating_sub(ttls.dedup_ms).to_string(),
        (ttls.dedup_ms / 1000 + 3600).to_string(),
        ttls.day_secs.to_string(),
        ttls.month_secs.to_string(),
        ttls.ledger_secs.to_string(),
        batch.records.len().to_string(),
        kinds,
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    args.extend(records);
    (keys, args)
}

fn batch_outcome(value: Value, records: usize) -> BatchOutcome {
    match value {
        Value::Array(parts) if parts.len() == 3 && bytes(&parts[0]) == Some(b"refused") => {
            let text =
                |v: &Value| String::from_utf8_lossy(bytes(v).unwrap_or_default()).into_owned();
            BatchOutcome::Refused {
                key: text(&parts[1]),
                reason: text(&parts[2]),
            }
        }
        Value::ServerError(e) => BatchOutcome::Failed(e.to_string()),
        other => match bytes(&other) {
            Some(flags) if flags.len() == records => {
                BatchOutcome::Applied(flags.iter().map(|f| *f == b'1').collect())
            }
            _ => BatchOutcome::Failed(format!("unexpected reply {other:?}")),
        },
    }
}

/// Whole units and 10⁻¹² units as two stored counts.
fn amount(whole: &Value, pico: &Value) -> Result<Amount, StoreError> {
    let (whole, pico) = (stored_count(whole)?, stored_count(pico)?);
    Ok(Amount(u128::from(whole) * PICO + u128::from(pico)))
}

fn spent_of(day: Value, month: Value) -> Result<StoredSpent, StoreError> {
    let (Value::Array(day), Value::Array(month)) = (&day, &month) else {
        return Err(StoreError::Rejected(format!(
            "usage sums answered {day:?} / {month:?}"
        )));
    };
    let get = |v: &[Value], i: usize| v.get(i).cloned().unwrap_or(Value::Nil);
    Ok(StoredSpent {
        tokens_day: stored_count(&get(day, 0))?.saturating_add(stored_count(&get(day, 1))?),
        cost_day: amount(&get(day, 3), &get(day, 2))?,
        cost_month: amount(&get(month, 1), &get(month, 0))?,
    })
}

/// A hash's fields as `HGETALL` (RESP2 list) gives them, read into per-prefix sums: `<prefix>:i`,
/// `:o`, `:c`, `:C` for the day hash (`T1`…`T12`, `d`), bare `i`, `o`, `c`, `C` for the month.
fn sums_of(fields: &Value) -> Result<Vec<(String, char, u64)>, StoreError> {
    let items = match fields {
        Value::Array(items) => items.as_slice(),
        Value::Map(_) | Value::Nil => &[],
        other => return Err(StoreError::Rejected(format!("sums answered {other:?}"))),
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        let [name, value] = pair else { break };
        let name = bytes(name)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| StoreError::Rejected("a field that is not text".into()))?;
        let (prefix, kind) = match name.rsplit_once(':') {
            Some((prefix, kind)) => (prefix, kind),
            None => ("", name),
        };
        let mut kind_chars = kind.chars();
        let (Some(kind), None) = (kind_chars.next(), kind_chars.next()) else {
            continue;
        };
        out.push((prefix.to_owned(), kind, stored_count(value)?));
    }
    Ok(out)
}

/// A sum's four stored fields: input, output, cost in 10⁻¹², whole cost units.
#[derive(Default, Clone, Copy)]
struct RawSum([u64; 4]);

impl RawSum {
    fn set(&mut self, kind: char, n: u64) {
        if let Some(i) = ['i', 'o', 'c', 'C'].iter().position(|k| *k == kind) {
            self.0[i] = n;
        }
    }

    fn totals(self) -> Totals {
        let [input, output, pico, whole] = self.0;
        Totals {
            requests: 0,
            input,
            output,
            cost: Amount(u128::from(whole) * PICO + u128::from(pico)),
        }
    }
}

fn report_of(reply: Value) -> Result<Vec<(String, StoredDay)>, StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(StoreError::Rejected(e.to_string())),
        other => {
            return Err(StoreError::Rejected(format!(
                "usage report answered {other:?}"
            )));
        }
    };
    let mut out = Vec::new();
    for triple in items.chunks(3) {
        let [id, day, month] = triple else { break };
        let id = bytes(id)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| StoreError::Rejected("an entry id that is not text".into()))?
            .to_owned();
        let mut slots = [RawSum::default(); SLOTS];
        let (mut whole_day, mut whole_month) = (RawSum::default(), RawSum::default());
        for (prefix, kind, n) in sums_of(day)? {
            let target = match prefix.as_str() {
                "d" => Some(&mut whole_day),
                slot => slot
                    .strip_prefix('T')
                    .and_then(|s| s.parse::<usize>().ok())
                    .and_then(|s| s.checked_sub(1))
                    .and_then(|i| slots.get_mut(i)),
            };
            if let Some(target) = target {
                target.set(kind, n);
            }
        }
        for (_, kind, n) in sums_of(month)? {
            whole_month.set(kind, n);
        }
        out.push((
            id,
            StoredDay {
                slots: slots.map(RawSum::totals),
                day: whole_day.totals(),
                month: whole_month.totals(),
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reports_are_read_into_exact_sums() {
        let day = Value::Array(
            [
                "T3:i", "14", "T3:o", "21", "T3:c", "4900000", "d:i", "14", "d:C", "2", "d:c", "5",
            ]
            .iter()
            .map(|s| bulk(s))
            .collect(),
        );
        let month = Value::Array(["i", "14", "C", "7"].iter().map(|s| bulk(s)).collect());
        let report = report_of(Value::Array(vec![bulk("e"), day, month])).unwrap();
        let (id, stored) = &report[0];
        assert_eq!(id, "e");
        assert_eq!(stored.slots[2].input, 14);
        assert_eq!(stored.slots[2].cost.plain(), "0.0000049");
        assert_eq!(stored.day.cost.plain(), "2.000000000005");
        assert_eq!(stored.month.cost.plain(), "7");
        assert!(report_of(Value::Array(vec![bulk("e"), bulk("x"), Value::Nil])).is_err());
    }

    #[test]
    fn script_replies() {
        assert_eq!(
            batch_outcome(bulk("101"), 3),
            BatchOutcome::Applied(vec![true, false, true])
        );
        assert!(matches!(
            batch_outcome(bulk("1"), 3),
            BatchOutcome::Failed(_)
        ));
        let refused = Value::Array(vec![bulk("refused"), bulk("k"), bulk("not a hash")]);
        assert_eq!(
            batch_outcome(refused, 1),
            BatchOutcome::Refused {
                key: "k".into(),
                reason: "not a hash".into()
            }
        );
    }
}
