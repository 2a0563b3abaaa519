//! The billing export (SPEC §10 `GET /admin/usage?month=YYYY-MM`): every consumer's requests,
//! tokens and exact cost in one month, per entry and local date, with month totals, as JSON or
//! (`Accept: text/csv`) as CSV.
//!
//! It owns gathering the month from wherever it lives and writing it out. With Redis, consumers
//! are found by SCAN (see `store::export`), never by asking every seed consumer, and each is read
//! in one atomic script, many per round trip; this replica's own increments and records that have
//! not reached Redis yet are added, read under the same gates `/api/tdl-matrix` and `/api/usage`
//! use, so nothing is counted twice or not at all. Embedded mode reads the in-process counters and
//! sums. Money stays in integers of 10⁻¹² ([`Totals`]) until it is printed as a plain decimal.
//!
//! `complete` is false when Redis could not be read in full: the document then holds what could be
//! read plus this replica's unwritten part. CSV has nowhere to say so, so an incomplete CSV export
//! is refused (503) rather than served as if it were whole.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use jiff::civil::Date;
use serde_json::{Value, json};

use super::{AdminError, Export, Params};
use crate::core::usage::Totals;
use crate::http::App;
use crate::store::export::StoredMonth;
use crate::tdl::HeldCalls;
use crate::usage::HeldMonth;

/// Consumers whose months are read from Redis in one round trip.
const READ_CHUNK: usize = 64;

/// The CSV header: one row per (consumer, entry, day) follows.
pub const CSV_HEADER: &str = "username,entry,date,requests,input_tokens,output_tokens,cost";

/// `GET /admin/usage`: the month of `month=YYYY-MM` (default: the current month in
/// `tdl.timezone`), as JSON or, when `csv`, as CSV.
pub async fn usage_export(app: &App, params: &Params, csv: bool) -> Result<Export, AdminError> {
    let month = match params.get("month") {
        Some(text) => parse_month(text)
            .ok_or_else(|| AdminError::BadRequest("month must be YYYY-MM".into()))?,
        None => app.counters.now().date.first_of_month(),
    };
    let sheet = gather(app, month).await;
    if !sheet.complete {
        tracing::warn!(
            month = %month_text(month),
            "billing export incomplete: Redis could not be read in full"
        );
    }
    if csv {
        if !sheet.complete {
            return Err(AdminError::Unavailable);
        }
        return Ok(Export::Csv(sheet.csv()));
    }
    Ok(Export::Json(sheet.json(month, &app.timezone_name)))
}

/// `YYYY-MM` (a four-digit year from 0001, a month 01–12) → its first day.
fn parse_month(text: &str) -> Option<Date> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    if b.len() != 7 || b[4] != b'-' || !digits(0..4) || !digits(5..7) {
        return None;
    }
    let year: i16 = text[..4].parse().ok()?;
    let month: i8 = text[5..].parse().ok()?;
    if year < 1 {
        return None;
    }
    Date::new(year, month, 1).ok()
}

fn month_text(month: Date) -> String {
    format!("{:04}-{:02}", month.year(), month.month())
}

/// Everything found for the month, whence it came.
async fn gather(app: &App, month: Date) -> Sheet {
    let first = month.first_of_month();
    let last = first.last_of_month();
    let mut sheet = Sheet {
        complete: true,
        ..Sheet::default()
    };
    // Consumer → the entries known to have month sums.
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let held = app.counters.held_consumers(first, last);
    for name in held.iter().chain(&app.usage.held_consumers(first)) {
        names.entry(name.to_string()).or_default();
    }
    let Some(store) = &app.store else {
        for name in names.keys() {
            sheet.add_held(
                name,
                &app.counters.held(name, first, last),
                &app.usage.held(name, first),
                None,
            );
        }
        return sheet;
    };
    if store.is_up() {
        let found = store.month_consumers(first).await;
        if let Some(error) = &found.error {
            tracing::warn!(%error, "billing export: the scan for consumers stopped early");
            sheet.complete = false;
        }
        for (name, entries) in found.consumers {
            names.entry(name).or_default().extend(entries);
        }
    } else {
        sheet.complete = false;
    }
    let instance = app.counters.instance().unwrap_or_default();
    let names: Vec<(&String, &BTreeSet<String>)> = names.iter().collect();
    let mut failed = 0usize;
    for chunk in names.chunks(READ_CHUNK) {
        // Held across the read and the look at memory: no share or waiting record moves from one
        // to the other in between (the same gates `/api/tdl-matrix` and `/api/usage` take).
        let _flushes = app.counters.hold_flushes().await;
        let _writes = app.usage.hold_writes().await;
        let read = if store.is_up() {
            let asked: Vec<(&str, Vec<&str>)> = chunk
                .iter()
                .map(|(name, entries)| {
                    (name.as_str(), entries.iter().map(String::as_str).collect())
                })
                .collect();
            store.read_months(&asked, first, instance).await.ok()
        } else {
            None
        };
        for (i, (name, _)) in chunk.iter().enumerate() {
            let stored = read
                .as_ref()
                .and_then(|r| r.get(i))
                .and_then(|r| r.as_ref().ok());
            if let Some(stored) = stored {
                sheet.add_stored(name, stored);
            } else {
                failed += 1;
                sheet.complete = false;
            }
            sheet.add_held(
                name,
                &app.counters.held(name, first, last),
                &app.usage.held(name, first),
                stored.map(|s| s.tdl_applied),
            );
        }
    }
    if failed > 0 {
        tracing::warn!(
            consumers = failed,
            "billing export: consumers whose month could not be read from Redis (only this replica's unwritten part is shown for them)"
        );
    }
    sheet
}

/// The month, by consumer and entry, sorted by name (byte order) and date.
#[derive(Debug, Default)]
struct Sheet {
    consumers: BTreeMap<String, BTreeMap<String, EntryMonth>>,
    /// Whether everything that exists was read.
    complete: bool,
}

/// One entry of one consumer in the month.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct EntryMonth {
    /// Requests, tokens and cost of each local date.
    days: BTreeMap<Date, Totals>,
    /// Tokens and cost of the whole month: the month's own sums, which outlive the days
    /// (13 months against `tdl.retention_days`). Requests are summed from the days.
    month: Totals,
}

impl EntryMonth {
    fn total(&self) -> Totals {
        let requests = self
            .days
            .values()
            .fold(0u64, |sum, d| sum.saturating_add(d.requests));
        Totals {
            requests,
            ..self.month
        }
    }

    /// The days with something in them.
    fn days(&self) -> impl Iterator<Item = (&Date, &Totals)> {
        self.days.iter().filter(|(_, t)| **t != Totals::default())
    }

    fn is_empty(&self) -> bool {
        self.days().next().is_none() && self.month == Totals::default()
    }
}

impl Sheet {
    fn entry(&mut self, consumer: &str, entry: &str) -> &mut EntryMonth {
        self.consumers
            .entry(consumer.to_owned())
            .or_default()
            .entry(entry.to_owned())
            .or_default()
    }

    fn add_day(&mut self, consumer: &str, entry: &str, date: Date, totals: &Totals) {
        self.entry(consumer, entry)
            .days
            .entry(date)
            .or_default()
            .add(totals);
    }

    fn add_calls(&mut self, consumer: &str, entry: &str, date: Date, calls: u64) {
        let calls = Totals {
            requests: calls,
            ..Totals::default()
        };
        self.add_day(consumer, entry, date, &calls);
    }

    /// What Redis holds of one consumer's month.
    fn add_stored(&mut self, consumer: &str, stored: &StoredMonth) {
        for (entry, date, totals) in &stored.usage_days {
            self.add_day(consumer, entry, *date, totals);
        }
        for (entry, date, calls) in &stored.request_days {
            self.add_calls(consumer, entry, *date, *calls);
        }
        for (entry, totals) in &stored.months {
            self.entry(consumer, entry).month.add(totals);
        }
    }

    /// What this process holds of one consumer's month. `applied`: the TDL ledger Redis answered
    /// with, when Redis was read: a share in flight up to it is in Redis's counts already.
    fn add_held(
        &mut self,
        consumer: &str,
        calls: &[HeldCalls],
        sums: &[HeldMonth],
        applied: Option<u64>,
    ) {
        for held in calls {
            let in_redis = held
                .in_flight
                .is_some_and(|seq| applied.is_some_and(|applied| seq <= applied));
            if !in_redis {
                self.add_calls(consumer, &held.entry, held.date, held.calls);
            }
        }
        for held in sums {
            for (date, totals) in &held.days {
                self.add_day(consumer, &held.entry, *date, totals);
            }
            self.entry(consumer, &held.entry).month.add(&held.month);
        }
    }

    /// (username, entry id, entry) of every entry with something in it, in order.
    fn entries(&self) -> impl Iterator<Item = (&str, &str, &EntryMonth)> {
        self.consumers.iter().flat_map(|(name, entries)| {
            entries
                .iter()
                .filter(|(_, e)| !e.is_empty())
                .map(move |(id, e)| (name.as_str(), id.as_str(), e))
        })
    }

    fn json(&self, month: Date, timezone: &str) -> Value {
        let mut consumers: Vec<Value> = Vec::new();
        let mut current: Option<(&str, Vec<Value>)> = None;
        for (name, id, entry) in self.entries() {
            if current.as_ref().is_some_and(|(n, _)| *n != name)
                && let Some((n, entries)) = current.take()
            {
                consumers.push(json!({"username": n, "entries": entries}));
            }
            let days: Vec<Value> = entry
                .days()
                .map(|(date, totals)| {
                    let mut day = totals_json(totals);
                    day["date"] = json!(date.to_string());
                    day
                })
                .collect();
            let item = json!({"id": id, "days": days, "total": totals_json(&entry.total())});
            current
                .get_or_insert_with(|| (name, Vec::new()))
                .1
                .push(item);
        }
        if let Some((n, entries)) = current {
            consumers.push(json!({"username": n, "entries": entries}));
        }
        json!({
            "month": month_text(month),
            "timezone": timezone,
            "complete": self.complete,
            "consumers": consumers,
        })
    }

    /// [`CSV_HEADER`], then one row per (consumer, entry, day); CRLF after every line (RFC 4180).
    fn csv(&self) -> String {
        let mut out = String::with_capacity(64 * (1 + self.consumers.len()));
        out.push_str(CSV_HEADER);
        out.push_str("\r\n");
        for (name, id, entry) in self.entries() {
            for (date, t) in entry.days() {
                csv_field(&mut out, name);
                out.push(',');
                csv_field(&mut out, id);
                let _ = write!(
                    out,
                    ",{date},{},{},{},{}\r\n",
                    t.requests,
                    t.input,
                    t.output,
                    t.cost.plain()
                );
            }
        }
        out
    }
}

/// `{"requests":n,"input_tokens":n,"output_tokens":n,"cost":"…"}` (cost as `/api/usage` writes it).
fn totals_json(t: &Totals) -> Value {
    json!({
        "requests": t.requests,
        "input_tokens": t.input,
        "output_tokens": t.output,
        "cost": t.cost.plain(),
    })
}

/// One CSV field, quoted (RFC 4180: `"` doubled) when it holds a comma, a quote, CR or LF.
fn csv_field(out: &mut String, text: &str) {
    if text.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::usage::Amount;
    use std::sync::Arc;

    fn date(s: &str) -> Date {
        s.parse().unwrap()
    }

    fn sums(input: u64, output: u64, cost: u128) -> Totals {
        Totals {
            requests: 0,
            input,
            output,
            cost: Amount(cost),
        }
    }

    #[test]
    fn months_are_yyyy_mm_only() {
        assert_eq!(parse_month("2026-12"), Some(date("2026-12-01")));
        assert_eq!(parse_month("0001-01"), Some(date("0001-01-01")));
        assert_eq!(parse_month("9999-12"), Some(date("9999-12-01")));
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-12",
            "2026-12-01",
            "2026/12",
            "",
            "0000-01",
            "+026-12",
            "2026-1a",
            "２０２６-12",
            "2026-12 ",
        ] {
            assert_eq!(parse_month(bad), None, "{bad:?}");
        }
        assert_eq!(month_text(date("0042-03-09")), "0042-03");
    }

    #[test]
    fn csv_fields_are_quoted_when_they_need_it() {
        let mut out = String::new();
        for field in ["plain", "a,b", "say \"hi\"", "two\r\nlines", "lf\n", ""] {
            csv_field(&mut out, field);
            out.push('|');
        }
        assert_eq!(
            out,
            "plain|\"a,b\"|\"say \"\"hi\"\"\"|\"two\r\nlines\"|\"lf\n\"||"
        );
    }

    /// A sheet filled out of order, with an empty day and an empty entry.
    fn sheet() -> Sheet {
        let mut s = Sheet {
            complete: true,
            ..Sheet::default()
        };
        s.add_day("zed", "m", date("2026-12-02"), &sums(1, 2, 3));
        s.add_calls("a,b", "y", date("2026-12-05"), 2);
        s.add_day(
            "a,b",
            "x",
            date("2026-12-09"),
            &sums(10, 0, 500_000_000_000),
        );
        s.add_day("a,b", "x", date("2026-12-01"), &sums(1, 1, 1));
        s.add_calls("a,b", "x", date("2026-12-01"), 3);
        s.add_calls("a,b", "x", date("2026-12-03"), 0);
        s.add_calls("empty", "e", date("2026-12-04"), 0);
        s.entry("a,b", "x").month.add(&sums(11, 1, 500_000_000_001));
        s.entry("a,b", "y").month.add(&Totals::default());
        s.entry("zed", "m").month.add(&sums(1, 2, 3));
        s
    }

    #[test]
    fn rows_are_sorted_by_username_entry_and_date_and_empty_ones_left_out() {
        let csv = sheet().csv();
        assert_eq!(
            csv,
            "username,entry,date,requests,input_tokens,output_tokens,cost\r\n\
             \"a,b\",x,2026-12-01,3,1,1,0.000000000001\r\n\
             \"a,b\",x,2026-12-09,0,10,0,0.5\r\n\
             \"a,b\",y,2026-12-05,2,0,0,0\r\n\
             zed,m,2026-12-02,0,1,2,0.000000000003\r\n"
        );
        let doc = sheet().json(date("2026-12-01"), "Asia/Seoul");
        assert_eq!(doc["month"], "2026-12");
        assert_eq!(doc["timezone"], "Asia/Seoul");
        assert_eq!(doc["complete"], true);
        let names: Vec<&str> = doc["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["username"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["a,b", "zed"],
            "the consumer with nothing is left out"
        );
        let x = &doc["consumers"][0]["entries"][0];
        assert_eq!(x["id"], "x");
        assert_eq!(
            x["days"],
            json!([
                {"date":"2026-12-01","requests":3,"input_tokens":1,"output_tokens":1,"cost":"0.000000000001"},
                {"date":"2026-12-09","requests":0,"input_tokens":10,"output_tokens":0,"cost":"0.5"}
            ])
        );
        // Tokens and cost from the month's own sums, requests from the days.
        assert_eq!(
            x["total"],
            json!({"requests":3,"input_tokens":11,"output_tokens":1,"cost":"0.500000000001"})
        );
        assert_eq!(doc["consumers"][0]["entries"][1]["id"], "y");
        assert_eq!(doc["consumers"][0]["entries"][1]["total"]["requests"], 2);
    }

    #[test]
    fn held_calls_in_flight_count_unless_redis_has_them() {
        let held = |in_flight| HeldCalls {
            entry: Arc::from("e"),
            date: date("2026-12-01"),
            calls: 5,
            in_flight,
        };
        let calls = [held(None), held(Some(4))];
        let requests = |applied| {
            let mut s = Sheet::default();
            s.add_held("u", &calls, &[], applied);
            s.entry("u", "e").total().requests
        };
        assert_eq!(requests(None), 10, "Redis not read: everything held counts");
        assert_eq!(requests(Some(3)), 10, "the share is not in Redis yet");
        assert_eq!(
            requests(Some(4)),
            5,
            "Redis applied the share: pending only"
        );
        let month = HeldMonth {
            entry: Arc::from("e"),
            days: vec![(date("2026-12-02"), sums(7, 0, 9))],
            month: sums(7, 0, 9),
        };
        let mut s = Sheet::default();
        s.add_stored(
            "u",
            &StoredMonth {
                usage_days: vec![("e".into(), date("2026-12-02"), sums(1, 1, 1))],
                request_days: vec![("e".into(), date("2026-12-02"), 2)],
                months: vec![("e".into(), sums(1, 1, 1))],
                tdl_applied: 0,
            },
        );
        s.add_held("u", &[], &[month], Some(0));
        let e = s.entry("u", "e").clone();
        assert_eq!(
            e.days[&date("2026-12-02")],
            Totals {
                requests: 2,
                input: 8,
                output: 1,
                cost: Amount(10)
            }
        );
        assert_eq!(e.total().cost, Amount(10));
    }
}
