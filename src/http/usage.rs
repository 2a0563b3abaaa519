//! `POST /usage` and `GET /api/usage` (SPEC §9): usage records in, exact sums out.
//!
//! Ingest answers per record, so a log shipper never retries a whole batch for one bad record:
//! a body that cannot be read at all (not JSON, more than 1000 records, too large) records
//! nothing; otherwise each record is checked (shape, time window, consumer, entry, price) and the
//! good ones are counted by [`crate::usage::UsageBook`], once per consumer and request id.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use jiff::Timestamp;
use jiff::civil::Date;
use serde_json::Value;
use subtle::ConstantTimeEq;

use super::answer::{self, Body};
use super::handlers::App;
use crate::core::decide::{Catalog, RouteMatch};
use crate::core::format::write_ascii_json_string;
use crate::core::limits::Limits;
use crate::core::usage::{Prices, Reject, Totals, check_time, read_record};
use crate::core::{BadBody, Consumer, Entry, MAX_USAGE_RECORDS, Refusal};
use crate::store::StoredDay;
use crate::tdl::SlotStamp;
use crate::usage::{Counted, Prepared};

/// Longest wait for a usage body: a full batch of Kong log objects can be megabytes.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

impl App {
    /// `POST /usage`: 404 without `usage.token`, 401 without the right bearer token.
    pub(super) async fn ingest(
        &self,
        parts: &Parts,
        body: Incoming,
    ) -> Result<Response<Body>, Refusal> {
        let Some(token) = &self.usage_token else {
            return Ok(answer::not_found());
        };
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !bool::from(given.trim_ascii().ct_eq(token)) {
            return Err(Refusal::UsageToken);
        }
        let announced = body.size_hint().exact();
        if announced.is_some_and(|n| n > self.usage_max_body) {
            return Err(Refusal::BodyTooLarge);
        }
        let bytes = tokio::time::timeout(
            BODY_TIMEOUT,
            super::body::collect(body, self.usage_max_body, announced),
        )
        .await
        .map_err(|_| Refusal::BodyTimeout)??;
        let records = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) if items.len() > MAX_USAGE_RECORDS => {
                return Err(Refusal::TooManyRecords);
            }
            Ok(Value::Array(items)) => items,
            Ok(one) => vec![one],
            Err(_) => return Err(Refusal::BadBody(BadBody::NotJson)),
        };
        let catalog = self.catalog.load_full();
        let now = self.usage.now();
        let mut prepared = Vec::with_capacity(records.len());
        let mut positions = Vec::with_capacity(records.len());
        let mut rejected = Vec::new();
        let mut consumers: Vec<(String, Option<Arc<Consumer>>)> = Vec::new();
        for (index, record) in records.iter().enumerate() {
            match self.prepare(&catalog, record, now, &mut consumers).await {
                Ok(p) => {
                    prepared.push(p);
                    positions.push(index);
                }
                Err(reject) => rejected.push((index, reject)),
            }
        }
        self.usage.count_rejected(rejected.len());
        let outcomes = self.usage.record(prepared).await;
        let duplicates = outcomes
            .iter()
            .filter(|o| **o == Counted::Duplicate)
            .count();
        let mut out = format!(
            "{{\"accepted\":{},\"duplicates\":{duplicates},\"rejected\":[",
            outcomes.len() - duplicates
        );
        for (i, (index, reject)) in rejected.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(
                out,
                "{sep}{{\"index\":{index},\"reason\":\"{}\"}}",
                reject.reason()
            );
        }
        out.push_str("]}");
        debug_assert_eq!(positions.len(), outcomes.len());
        Ok(answer::json(StatusCode::OK, out))
    }

    /// One record, checked and priced. `consumers` remembers this body's lookups.
    async fn prepare(
        &self,
        catalog: &Catalog,
        value: &Value,
        now: Timestamp,
        consumers: &mut Vec<(String, Option<Arc<Consumer>>)>,
    ) -> Result<Prepared, Reject> {
        let record = read_record(value)?;
        let time = record.time.unwrap_or(now);
        check_time(time, now, self.usage.dedup())?;
        let consumer = match consumers.iter().find(|(name, _)| *name == record.consumer) {
            Some((_, found)) => found.clone(),
            None => {
                let found = self
                    .resolver
                    .consumer_named(catalog, &record.consumer)
                    .await
                    .unwrap_or_else(|_| catalog.by_name.get(record.consumer.as_str()).cloned());
                consumers.push((record.consumer.clone(), found.clone()));
                found
            }
        };
        let consumer = consumer.ok_or(Reject::UnknownConsumer)?;
        let entry = catalog
            .policy
            .usage_entry(&consumer, &record.entry)
            .ok_or(Reject::EntryNotAvailable)?;
        let cost = Prices::of(&entry.fields)
            .cost(&record.tokens)
            .ok_or(Reject::CostOutOfRange)?;
        Ok(Prepared {
            consumer: consumer.username.clone(),
            entry: entry.id.clone(),
            request_id: record.request_id,
            time,
            totals: Totals::of(&record.tokens, cost),
        })
    }

    /// `/api/usage`: requests (section 7), tokens and exact cost per slot, day and month of
    /// `date` (default today), with the entries' limits and what remains of them now.
    pub(super) async fn usage_json(
        &self,
        catalog: &Catalog,
        consumer: &Arc<Consumer>,
        routes: &RouteMatch<'_>,
        parts: &Parts,
    ) -> Result<String, Refusal> {
        let today = self.counters.now();
        let date = match requested_date(parts) {
            Ok(date) => date.unwrap_or(today.date),
            Err(()) => return Err(Refusal::InvalidRequest),
        };
        let applicable = catalog.policy.applicable_list(consumer, routes);
        let known: Vec<&str> = applicable
            .map(|l| l.entries().iter().map(|e| &*e.id).collect())
            .unwrap_or_default();
        let mut requests = self.counters.usage(&consumer.username, date, &known).await;
        if let Some(others) = requests.entries.get_mut(known.len()..) {
            others.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let with_requests: Vec<&str> = requests.entries.iter().map(|(id, _)| &**id).collect();
        let mut sums = self
            .usage
            .report(&consumer.username, date, &with_requests)
            .await;
        if let Some(others) = sums.entries.get_mut(with_requests.len()..) {
            others.sort_by(|a, b| a.0.cmp(&b.0));
        }
        for (id, stored) in &mut sums.entries {
            if let Some((_, counts)) = requests.entries.iter().find(|(r, _)| r == id) {
                for (slot, n) in stored.slots.iter_mut().zip(counts) {
                    slot.requests = *n;
                }
                stored.day.requests = counts.iter().sum();
            }
        }
        let ids: Vec<&str> = sums.entries.iter().map(|(id, _)| &**id).collect();
        let month_requests = self.month_requests(consumer, &ids, date).await;
        let lists: Vec<_> = catalog.policy.describing_lists(consumer).collect();
        let mut out = String::from("{\"timezone\":");
        write_ascii_json_string(&mut out, &self.timezone_name);
        let _ = write!(
            out,
            ",\"date\":\"{date}\",\"complete\":{},\"entries\":[",
            requests.complete && sums.complete
        );
        for (i, (id, stored)) in sums.entries.iter().enumerate() {
            let entry = lists.iter().find_map(|l| l.find(id));
            out.push_str(if i > 0 { ",{\"id\":" } else { "{\"id\":" });
            write_ascii_json_string(&mut out, id);
            out.push_str(",\"provider_name\":");
            write_ascii_json_string(&mut out, entry.map_or("", |e| &e.fields.provider_name));
            out.push_str(",\"slots\":{");
            for (slot, totals) in stored.slots.iter().enumerate() {
                let _ = write!(out, "{}\"T{}\":", if slot > 0 { "," } else { "" }, slot + 1);
                totals.write_json(&mut out);
            }
            out.push_str("},\"day\":");
            stored.day.write_json(&mut out);
            out.push_str(",\"month\":");
            let mut month = stored.month;
            month.requests = month_requests.get(i).copied().unwrap_or(0);
            month.write_json(&mut out);
            match entry.and_then(|e| e.fields.limits.as_ref().map(|l| (e, l))) {
                Some((entry, limits)) => {
                    out.push_str(",\"limits\":");
                    limits.write_json(&mut out);
                    out.push_str(",\"remaining\":");
                    let today_sums = (date == today.date).then_some(stored);
                    self.write_remaining(&mut out, consumer, entry, limits, today_sums, today)
                        .await;
                }
                None => out.push_str(",\"limits\":null,\"remaining\":null"),
            }
            out.push('}');
        }
        out.push_str("]}");
        Ok(out)
    }

    /// The month's requests of each of `entries`: the section 7 counts of every day of `date`'s
    /// month up to it (one read per day for all of them).
    async fn month_requests(&self, consumer: &Consumer, entries: &[&str], date: Date) -> Vec<u64> {
        let mut totals = vec![0u64; entries.len()];
        let mut day = date.first_of_month();
        while day <= date {
            let counts = self.counters.usage(&consumer.username, day, entries).await;
            for (total, id) in totals.iter_mut().zip(entries) {
                if let Some((_, c)) = counts.entries.iter().find(|(e, _)| e == id) {
                    *total += c.iter().sum::<u64>();
                }
            }
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => break,
            }
        }
        totals
    }

    /// What remains of each limit now: request windows from the section 7 counts (the minute
    /// from this replica's quota), budgets from the sums just read (today) or the budget view.
    async fn write_remaining(
        &self,
        out: &mut String,
        consumer: &Arc<Consumer>,
        entry: &Arc<Entry>,
        limits: &Limits,
        today_sums: Option<&StoredDay>,
        today: SlotStamp,
    ) {
        let mut fields: Vec<String> = Vec::new();
        let requests = self.quotas.peek(&consumer.username, &entry.id, limits);
        let day_calls = match today_sums {
            Some(s) => (
                s.day.requests,
                s.slots[usize::from(today.slot - 1)].requests,
            ),
            None => {
                let counts = self
                    .counters
                    .usage(&consumer.username, today.date, &[&entry.id])
                    .await;
                let slots = counts.entries.first().map(|(_, c)| *c).unwrap_or_default();
                (slots.iter().sum(), slots[usize::from(today.slot - 1)])
            }
        };
        for standing in &requests {
            let remaining = match standing.member {
                "slot" => standing.limit.limit.saturating_sub(day_calls.1),
                "day" => standing.limit.limit.saturating_sub(day_calls.0),
                _ => standing.remaining,
            };
            let name = match standing.member {
                "minute" => "requests_per_minute",
                "slot" => "requests_per_slot",
                _ => "requests_per_day",
            };
            fields.push(format!("\"{name}\":{remaining}"));
        }
        if limits.has_budgets() {
            let spent = match today_sums {
                Some(s) => crate::core::quota::Spent {
                    tokens_day: s.day.input.saturating_add(s.day.output),
                    cost_day: s.day.cost,
                    cost_month: s.month.cost,
                },
                None => self.usage.spent(&consumer.username, &entry.id).await,
            };
            if let Some(limit) = limits.tokens_per_day {
                fields.push(format!(
                    "\"tokens_per_day\":{}",
                    limit.saturating_sub(spent.tokens_day)
                ));
            }
            for (name, limit, used) in [
                ("cost_per_day", &limits.cost_per_day, spent.cost_day),
                ("cost_per_month", &limits.cost_per_month, spent.cost_month),
            ] {
                if let Some(limit) = limit {
                    let left = crate::core::usage::Amount::of(limit).saturating_sub(used);
                    fields.push(format!("\"{name}\":\"{}\"", left.plain()));
                }
            }
        }
        out.push('{');
        out.push_str(&fields.join(","));
        out.push('}');
    }
}

/// `date=YYYY-MM-DD` from the query, if given; `Err` when it is not a date.
fn requested_date(parts: &Parts) -> Result<Option<Date>, ()> {
    let Some(query) = parts.uri.query() else {
        return Ok(None);
    };
    match form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "date") {
        Some((_, value)) => value.parse::<Date>().map(Some).map_err(|_| ()),
        None => Ok(None),
    }
}
