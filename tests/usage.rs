//! Usage ingest, exact billing and token/cost budgets (SPEC §8.1 and §9) against the real binary,
//! with real `redis-server` processes: `POST /usage` (native records, OpenAI and Anthropic `usage`
//! objects, Kong `http-log` payloads), its token and body bounds, per-consumer deduplication across
//! replicas, retries and a Redis outage, `/api/usage` totals to the last 10⁻¹² (computed here in
//! integers), and the budgets that `/auth` enforces on every replica.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::money::{UNIT, decimal, units};
use common::redis::Redis;
use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "usage-ingest-token-7f3a";
const TDL: &str = "{T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}";

// ---------------------------------------------------------------------------------------------
// Seeds and services

/// A flow-style metadata entry at the indentation of a `metadata_list` item; `extra` is appended
/// inside the braces (e.g. `", limits: {tokens_per_day: 10}"`).
fn entry(id: &str, input: &str, output: &str, extra: &str) -> String {
    format!(
        "            - {{id: {id}, provider_name: p-{id}, tdl_matrix: {TDL}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: {input}, output_cost_per_token: {output}{extra}}}\n"
    )
}

/// A consumer with one key and its own metadata list.
fn consumer(name: &str, key: &str, entries: &[String]) -> String {
    format!(
        "  - username: {name}\n    keyauth_credentials: [{{key: {key}}}]\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n{}",
        entries.concat()
    )
}

fn seed(consumers: &[String]) -> String {
    let mut out = String::from("consumers:\n");
    for c in consumers {
        out.push_str(c);
    }
    out
}

/// A service on `redis` (embedded when `None`), with `token` as `UMA_USAGE__TOKEN` when given,
/// ready (and connected to Redis) before it is returned.
fn serve(
    redis: Option<&Redis>,
    config: &str,
    seed: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Service {
    let url = redis.map(Redis::url).unwrap_or_default();
    let mut env: Vec<(&str, &str)> = vec![("UMA_REDIS__URL", url.as_str())];
    if redis.is_some() {
        env.push(("UMA_REDIS__COMMAND_TIMEOUT_MS", "2000"));
    }
    if let Some(token) = token {
        env.push(("UMA_USAGE__TOKEN", token));
    }
    env.extend_from_slice(extra);
    let service = Service::with_files_env(config, seed, &env);
    let started = Instant::now();
    while service.get("/readyz", &[]).status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never ready:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    if redis.is_some() {
        wait_connected(&service, true);
    }
    service
}

fn wait_connected(service: &Service, connected: bool) {
    let started = Instant::now();
    while service.get("/readyz", &[]).json()["redis"]["connected"] != connected {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/readyz never said connected={connected}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A POST with a body on a fresh connection; the body is written by a second thread while the
/// answer is read, so an answer given before the body is read (413) is still seen.
fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().expect("clone the stream");
    std::thread::scope(|scope| {
        scope.spawn(move || {
            // The service may answer and close before reading everything: a failed write is fine.
            if writer.write_all(head.as_bytes()).is_ok() {
                let _ = writer.write_all(body);
            }
        });
        read_response(&mut stream, false)
    })
}

/// `POST /usage` with `Authorization: <authorization>` when given.
fn post_usage(service: &Service, authorization: Option<&str>, body: &[u8]) -> Response {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    post(service.addr, "/usage", &headers, body)
}

/// The answer of an ingest: 200 `{"accepted":n,"duplicates":n,"rejected":[{"index":i,"reason":"…"}]}`.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    accepted: u64,
    duplicates: u64,
    rejected: Vec<(u64, String)>,
}

fn ok(accepted: u64, duplicates: u64) -> Outcome {
    Outcome {
        accepted,
        duplicates,
        rejected: vec![],
    }
}

fn outcome(r: &Response) -> Outcome {
    assert_eq!(r.status, 200, "ingest answer: {r:?}");
    let doc = r.json();
    let keys: BTreeSet<&str> = doc
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {doc}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["accepted", "duplicates", "rejected"]),
        "ingest answer fields: {doc}"
    );
    let rejected = doc["rejected"]
        .as_array()
        .unwrap_or_else(|| panic!("rejected is not an array: {doc}"))
        .iter()
        .map(|item| {
            let fields: BTreeSet<&str> = item
                .as_object()
                .unwrap_or_else(|| panic!("rejected item not an object: {doc}"))
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(fields, BTreeSet::from(["index", "reason"]), "{doc}");
            (
                item["index"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("index: {doc}")),
                item["reason"]
                    .as_str()
                    .unwrap_or_else(|| panic!("reason: {doc}"))
                    .to_owned(),
            )
        })
        .collect();
    Outcome {
        accepted: doc["accepted"]
            .as_u64()
            .unwrap_or_else(|| panic!("accepted: {doc}")),
        duplicates: doc["duplicates"]
            .as_u64()
            .unwrap_or_else(|| panic!("duplicates: {doc}")),
        rejected,
    }
}

/// Ingests `body` (a JSON value: one record or an array) with the right token.
fn ingest(service: &Service, body: &Value) -> Outcome {
    outcome(&post_usage(
        service,
        Some(&format!("Bearer {TOKEN}")),
        body.to_string().as_bytes(),
    ))
}

fn message(r: &Response) -> String {
    r.json()["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {r:?}"))
        .to_owned()
}

fn auth(service: &Service, key: &str, uri: &str) -> Response {
    service.get("/auth", &[("apikey", key), ("X-Forwarded-Uri", uri)])
}

/// A line of `/metrics` (`name{labels} value`, or `name value`); 0 when absent.
/// `uma_usage_records_total` by result: accepted, duplicate, rejected.
fn record_results(service: &Service) -> [f64; 3] {
    ["accepted", "duplicate", "rejected"].map(|r| {
        metric(
            service,
            &format!("uma_usage_records_total{{result=\"{r}\"}}"),
        )
    })
}

fn metric(service: &Service, series: &str) -> f64 {
    let text = service.get("/metrics", &[]).body;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Polls `f` every 20 ms until it gives `Ok`, up to `limit` (a hang guard, never a timing assert).
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> (T, Duration) {
    let started = Instant::now();
    loop {
        match f() {
            Ok(v) => return (v, started.elapsed()),
            Err(last) => assert!(
                started.elapsed() < limit,
                "{what}: not so within {limit:?}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Time

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// RFC 3339 in UTC with a `Z`, with milliseconds when `fraction`.
fn rfc3339(ms: i64, fraction: bool) -> String {
    let ts = jiff::Timestamp::from_millisecond(ms).expect("timestamp");
    let format = if fraction {
        "%Y-%m-%dT%H:%M:%S%.3fZ"
    } else {
        "%Y-%m-%dT%H:%M:%SZ"
    };
    ts.strftime(format).to_string()
}

/// RFC 3339 with a numeric offset of `hours` (e.g. `…T17:00:00+09:00`).
fn rfc3339_offset(ms: i64, hours: i8) -> String {
    let ts = jiff::Timestamp::from_millisecond(ms).expect("timestamp");
    ts.to_zoned_datetime(jiff::tz::TimeZone::fixed(jiff::tz::offset(hours)))
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// The UTC slot (0-based: 0 = T1) of an instant.
fn slot_of(ms: i64) -> usize {
    (ms.div_euclid(1000).rem_euclid(86_400) / 7_200) as usize
}

fn utc_date(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .expect("timestamp")
        .strftime("%Y-%m-%d")
        .to_string()
}

/// Milliseconds of today's UTC midnight, and of now; waits until at least `min_elapsed_s`
/// seconds of the day have passed (so "earlier today" exists).
fn today_so_far(min_elapsed_s: i64) -> (i64, i64) {
    away_from_midnight();
    loop {
        let now = now_ms();
        let midnight = now - now.rem_euclid(86_400_000);
        if now - midnight >= min_elapsed_s * 1000 {
            return (midnight, now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A moment at most a second ago, never before today's UTC midnight.
fn recent_ms() -> i64 {
    let now = now_ms();
    (now - 1_000).max(now - now.rem_euclid(86_400_000))
}

/// Seconds to the end of the UTC month, and the length of the month in seconds.
fn month_end() -> (u64, u64) {
    let now = jiff::Timestamp::now();
    let date = now.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
    let start = date
        .first_of_month()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .expect("month start")
        .timestamp()
        .as_second();
    let length = i64::from(date.days_in_month()) * 86_400;
    ((start + length - now.as_second()) as u64, length as u64)
}

// ---------------------------------------------------------------------------------------------
// Money, exactly

/// A cost string of the API, held to the format (`"0"`, `"12"`, `"0.0000049"`), in units.
fn parse_cost(text: &str) -> Result<u128, String> {
    let bad = || format!("cost {text:?} is not a plain decimal without trailing zeros");
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (int.len() > 1 && int.starts_with('0')) {
        return Err(bad());
    }
    if text.contains('.') && (!digits(frac) || frac.ends_with('0') || frac.len() > 12) {
        return Err(bad());
    }
    let int: u128 = int.parse().map_err(|_| bad())?;
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<12}").parse().map_err(|_| bad())?
    };
    Ok(int * UNIT + frac)
}

// ---------------------------------------------------------------------------------------------
// /api/usage

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Agg {
    requests: u64,
    input: u64,
    output: u64,
    cost: u128,
}

impl Agg {
    fn add(&mut self, other: &Agg) {
        self.requests += other.requests;
        self.input += other.input;
        self.output += other.output;
        self.cost += other.cost;
    }

    fn tokens(&self) -> (u64, u64, u128) {
        (self.input, self.output, self.cost)
    }
}

impl std::fmt::Display for Agg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "requests={} input={} output={} cost={}",
            self.requests,
            self.input,
            self.output,
            decimal(self.cost)
        )
    }
}

/// One entry of `/api/usage`.
#[derive(Debug)]
struct EntryUsage {
    provider_name: String,
    slots: [Agg; 12],
    day: Agg,
    month: Agg,
    limits: Value,
    remaining: Value,
}

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn agg(v: &Value, what: &str) -> Result<Agg, String> {
    let want: BTreeSet<String> = ["requests", "input_tokens", "output_tokens", "cost"]
        .map(String::from)
        .into();
    if v.as_object().map(|_| keys_of(v)) != Some(want) {
        return Err(format!("{what}: fields of {v}"));
    }
    let n = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| format!("{what}.{k} is not an integer: {v}"))
    };
    let cost = v["cost"]
        .as_str()
        .ok_or_else(|| format!("{what}.cost is not a string: {v}"))?;
    Ok(Agg {
        requests: n("requests")?,
        input: n("input_tokens")?,
        output: n("output_tokens")?,
        cost: parse_cost(cost).map_err(|e| format!("{what}: {e}"))?,
    })
}

/// GET /api/usage (with `query`, e.g. `?date=…`) for `key`; the document, its shape checked.
fn usage_doc(service: &Service, key: &str, query: &str) -> Value {
    let r = service.get(&format!("/api/usage{query}"), &[("apikey", key)]);
    assert_eq!(r.status, 200, "/api/usage{query}: {r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{r:?}"
    );
    let doc = r.json();
    assert_eq!(
        keys_of(&doc),
        ["timezone", "date", "complete", "entries"]
            .map(String::from)
            .into(),
        "/api/usage fields: {doc}"
    );
    assert_eq!(doc["timezone"], "UTC", "{doc}");
    assert!(doc["complete"].is_boolean(), "{doc}");
    doc
}

fn entry_usage(doc: &Value, id: &str) -> Result<EntryUsage, String> {
    let entries = doc["entries"]
        .as_array()
        .ok_or_else(|| format!("entries: {doc}"))?;
    let e = entries
        .iter()
        .find(|e| e["id"] == id)
        .ok_or_else(|| format!("no entry {id} in {doc}"))?;
    let want: BTreeSet<String> = [
        "id",
        "provider_name",
        "slots",
        "day",
        "month",
        "limits",
        "remaining",
    ]
    .map(String::from)
    .into();
    if keys_of(e) != want {
        return Err(format!("entry fields: {e}"));
    }
    let slot_names: BTreeSet<String> = (1..=12).map(|i| format!("T{i}")).collect();
    if e["slots"].as_object().map(|_| keys_of(&e["slots"])) != Some(slot_names) {
        return Err(format!("{id}: slots are not exactly T1..T12: {e}"));
    }
    let mut slots = [Agg::default(); 12];
    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = agg(
            &e["slots"][format!("T{}", i + 1)],
            &format!("{id}.T{}", i + 1),
        )?;
    }
    Ok(EntryUsage {
        provider_name: e["provider_name"].as_str().unwrap_or_default().to_owned(),
        slots,
        day: agg(&e["day"], &format!("{id}.day"))?,
        month: agg(&e["month"], &format!("{id}.month"))?,
        limits: e["limits"].clone(),
        remaining: e["remaining"].clone(),
    })
}

fn sum_slots(slots: &[Agg; 12]) -> Agg {
    let mut total = Agg::default();
    for s in slots {
        total.add(s);
    }
    total
}

/// `limits` as the seed wrote them: same members, same numbers (2 and 2.0 alike).
fn assert_limits(actual: &Value, expected: &Value, what: &str) {
    assert_eq!(
        keys_of(actual),
        keys_of(expected),
        "{what}: limits {actual}"
    );
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(
            actual[k].as_f64(),
            v.as_f64(),
            "{what}: limits.{k} in {actual}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Records

/// A native record (SPEC §9).
fn native(
    id: &str,
    consumer: &str,
    entry: &str,
    input: u64,
    output: u64,
    time: Option<&str>,
) -> Value {
    let mut v = json!({"request_id": id, "consumer": consumer, "metadata_id": entry,
        "input_tokens": input, "output_tokens": output});
    if let Some(t) = time {
        v["time"] = json!(t);
    }
    v
}

/// A Kong `http-log` payload with AI analytics, shaped as Kong 3.x sends it.
fn kong(
    id: Option<&str>,
    username: Option<&str>,
    headers: &[(&str, &str)],
    usage: Value,
    started_at_ms: i64,
) -> Value {
    let mut request_headers = json!({"host": "gateway.example", "user-agent": "curl/8.5.0",
        "content-type": "application/json"});
    for (k, v) in headers {
        request_headers[*k] = json!(v);
    }
    let mut request = json!({"method": "POST", "uri": "/gpt4o/chat", "url": "http://gateway.example:8000/gpt4o/chat",
        "size": 312, "querystring": {}, "headers": request_headers});
    if let Some(id) = id {
        request["id"] = json!(id);
    }
    let mut record = json!({
        "request": request,
        "response": {"status": 200, "size": 1024, "headers": {"content-type": "application/json"}},
        "route": {"id": "0c2c0d8e-4b6b-4a8b-9b5e-2a4c2c6b1f10", "name": "gpt4o-chat", "paths": ["/gpt4o/chat"]},
        "service": {"id": "7f8d7a14-3a61-4f3c-a4d4-3c1ef3e2a9d1", "name": "openai-api"},
        "latencies": {"request": 812, "kong": 3, "proxy": 809},
        "client_ip": "10.0.0.7",
        "upstream_uri": "/v1/chat/completions",
        "tries": [{"ip": "203.0.113.10", "port": 443, "balancer_latency": 0}],
        "started_at": started_at_ms,
        "ai": {"proxy": {
            "usage": usage,
            "meta": {"plugin_id": "6e3a1bce-1d4b-4b5e-9e3d-2b8c8f0c1a2b", "provider_name": "openai",
                     "request_model": "gpt-4o", "response_model": "gpt-4o-2024-08-06", "llm_latency": 805}
        }}
    });
    if let Some(name) = username {
        record["consumer"] = json!({"id": "b6d2f1a0-3c1e-4e9a-8f7b-1d2c3b4a5e6f", "username": name,
            "created_at": 1_700_000_000});
    }
    record
}

/// Expected totals per (consumer, entry), slot by slot, computed in integers.
#[derive(Default)]
struct Ledger {
    prices: BTreeMap<(String, String), (u128, u128)>,
    slots: BTreeMap<(String, String), [Agg; 12]>,
    requests: BTreeMap<(String, String), u64>,
}

impl Ledger {
    fn price(&mut self, consumer: &str, entry: &str, input: &str, output: &str) {
        self.prices.insert(
            (consumer.to_owned(), entry.to_owned()),
            (units(input), units(output)),
        );
        self.slots
            .entry((consumer.to_owned(), entry.to_owned()))
            .or_default();
    }

    /// Adds a record with `cost` given explicitly (None: the plain formula).
    fn add_priced(
        &mut self,
        consumer: &str,
        entry: &str,
        input: u64,
        output: u64,
        ms: i64,
        cost: Option<u128>,
    ) {
        let key = (consumer.to_owned(), entry.to_owned());
        let (pi, po) = self.prices[&key];
        let cost = cost.unwrap_or(u128::from(input) * pi + u128::from(output) * po);
        let slot = &mut self.slots.get_mut(&key).expect("priced")[slot_of(ms)];
        slot.add(&Agg {
            requests: 0,
            input,
            output,
            cost,
        });
    }

    fn add(&mut self, consumer: &str, entry: &str, input: u64, output: u64, ms: i64) {
        self.add_priced(consumer, entry, input, output, ms, None);
    }

    fn day(&self, consumer: &str, entry: &str) -> Agg {
        let key = (consumer.to_owned(), entry.to_owned());
        let mut day = sum_slots(&self.slots[&key]);
        day.requests = self.requests.get(&key).copied().unwrap_or(0);
        day
    }

    /// Err(description) unless the `/api/usage` entry of (consumer, entry) in `doc` shows exactly
    /// these totals: every slot's tokens and cost, the day and the month (requests included).
    fn matches(&self, doc: &Value, consumer: &str, entry: &str) -> Result<(), String> {
        let key = (consumer.to_owned(), entry.to_owned());
        let shown = entry_usage(doc, entry)?;
        let want = &self.slots[&key];
        for (i, (shown, want)) in shown.slots.iter().zip(want).enumerate() {
            if shown.tokens() != want.tokens() {
                return Err(format!(
                    "{consumer}/{entry} T{}: shown {shown} expected {want}",
                    i + 1
                ));
            }
        }
        let day = self.day(consumer, entry);
        if shown.day != day {
            return Err(format!(
                "{consumer}/{entry} day: shown {} expected {day}",
                shown.day
            ));
        }
        // Every record of these tests is of this month, on a fresh Redis: the month is the day.
        if shown.month != day {
            return Err(format!(
                "{consumer}/{entry} month: shown {} expected {day}",
                shown.month
            ));
        }
        let slots = sum_slots(&shown.slots);
        if slots.tokens() != shown.day.tokens() || slots.requests != shown.day.requests {
            return Err(format!(
                "{consumer}/{entry}: the slots add up to {slots}, the day says {}",
                shown.day
            ));
        }
        Ok(())
    }
}

/// Splitmix64: reproducible records without a dev-dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RateLimit fields (as tests/quotas.rs reads them)

type Members = Vec<(String, Vec<(String, u64)>)>;

fn members(field: &str) -> Members {
    field
        .split(',')
        .map(str::trim)
        .map(|member| {
            let mut parts = member.split(';');
            let name = parts.next().unwrap();
            assert!(
                name.starts_with('"') && name.ends_with('"') && name.len() > 2,
                "{field}"
            );
            let params = parts
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("{field}"));
                    assert!(v.len() <= 15, "{field}");
                    (
                        k.to_owned(),
                        v.parse().unwrap_or_else(|_| panic!("{field}")),
                    )
                })
                .collect();
            (name.trim_matches('"').to_owned(), params)
        })
        .collect()
}

fn names(members: &Members) -> BTreeSet<&str> {
    members.iter().map(|(n, _)| n.as_str()).collect()
}

fn param(members: &Members, name: &str, key: &str) -> u64 {
    let (_, params) = members
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no member {name} in {members:?}"));
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {key} on {name}: {members:?}"))
}

fn policy(r: &Response) -> Members {
    members(
        r.header("ratelimit-policy")
            .unwrap_or_else(|| panic!("no RateLimit-Policy: {r:?}")),
    )
}

fn state(r: &Response) -> Members {
    members(
        r.header("ratelimit")
            .unwrap_or_else(|| panic!("no RateLimit: {r:?}")),
    )
}

/// The budget member `name`'s `r` on an answer of `/auth`.
fn remaining(r: &Response, name: &str) -> u64 {
    param(&state(r), name, "r")
}

/// A budget 429: exact body, `X-Uma-Limit: budget`, `Retry-After` about `retry` seconds.
fn assert_budget_429(r: &Response, retry: u64, what: &str) {
    assert_eq!(r.status, 429, "{what}: {r:?}");
    assert_eq!(
        r.json(),
        json!({"message": "Usage budget exceeded"}),
        "{what}: {r:?}"
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: {r:?}"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
    assert_eq!(r.header("x-uma-limit"), Some("budget"), "{what}: {r:?}");
    assert_eq!(r.header("x-consumer-id"), None, "{what}: metadata on a 429");
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Retry-After: {r:?}"));
    assert!(
        after >= 1 && after.abs_diff(retry) <= 2,
        "{what}: Retry-After {after}, expected about {retry}"
    );
}

// =============================================================================================
// 1. Exactness

#[derive(Clone)]
struct Rec {
    consumer: &'static str,
    entry: &'static str,
    id: String,
    input: u64,
    output: u64,
    ms: i64,
    fraction: bool,
}

impl Rec {
    fn json(&self) -> Value {
        native(
            &self.id,
            self.consumer,
            self.entry,
            self.input,
            self.output,
            Some(&rfc3339(self.ms, self.fraction)),
        )
    }
}

#[test]
fn ten_thousand_records_from_two_replicas_add_up_exactly() {
    let (midnight, now) = today_so_far(5);
    let today = utc_date(now);
    let redis = Redis::start();
    // Awkward prices (SPEC §9: exact as written, never through f64); bob's `a1` is priced
    // differently from alice's (per-user pricing).
    let prices: [(&str, &str, &str, &str); 5] = [
        ("alice", "a1", "3e-8", "1.5e-7"),
        ("alice", "a2", "0.000000075", "2"),
        ("alice", "a3", "2", "3e-8"),
        ("bob", "a1", "1.5e-7", "0.000000075"),
        ("bob", "b2", "0.000000075", "3e-8"),
    ];
    let entries_of = |who: &str| -> Vec<String> {
        prices
            .iter()
            .filter(|p| p.0 == who)
            .map(|p| entry(p.1, p.2, p.3, ""))
            .collect()
    };
    let seed = seed(&[
        consumer("alice", "ak", &entries_of("alice")),
        consumer("bob", "bk", &entries_of("bob")),
    ]);
    let env = [("UMA_USAGE__DEDUP_HOURS", "24")];
    let a = serve(Some(&redis), "", &seed, Some(TOKEN), &env);
    let b = serve(Some(&redis), "", &seed, Some(TOKEN), &env);
    let mut ledger = Ledger::default();
    for (c, e, i, o) in prices {
        ledger.price(c, e, i, o);
    }
    // Five allowed calls: `requests` are the section 7 counts (alice's first entry).
    for _ in 0..5 {
        assert_eq!(auth(&a, "ak", "/chat").header("x-consumer-id"), Some("a1"));
    }
    ledger
        .requests
        .insert(("alice".to_owned(), "a1".to_owned()), 5);

    // 10,000 unique records: alice r0..r5999, bob r0..r3999 (the same ids: dedup is per consumer).
    const N: usize = 10_000;
    let mut rng = Rng(0x5eed_0011);
    let elapsed_s = ((now - midnight) / 1000 - 1) as u64;
    let mut recs: Vec<Rec> = (0..N)
        .map(|i| {
            let (consumer, number, choices): (&'static str, usize, &[&'static str]) = if i < 6000 {
                ("alice", i, &["a1", "a2", "a3"])
            } else {
                ("bob", i - 6000, &["a1", "b2"])
            };
            let entry = choices[rng.below(choices.len() as u64) as usize];
            let mut tokens = || match rng.below(100) {
                0..5 => 0,
                5..90 => rng.below(5_000),
                90..99 => rng.below(2_000_000),
                _ => rng.below(1_000_000_000),
            };
            let (input, output) = (tokens(), tokens());
            let fraction = rng.below(2) == 0;
            let ms = midnight
                + rng.below(elapsed_s) as i64 * 1000
                + if fraction { rng.below(1000) as i64 } else { 0 };
            Rec {
                consumer,
                entry,
                id: format!("r{number}"),
                input,
                output,
                ms,
                fraction,
            }
        })
        .collect();
    // The largest token count allowed (10¹²) at a price of 2: no counter may overflow below 10¹⁵.
    recs[0].entry = "a3";
    recs[0].input = 1_000_000_000_000;
    recs[1].entry = "a2";
    recs[1].output = 999_999_999_999;
    recs[6000].entry = "a1";
    recs[6000].input = 1_000_000_000_000;
    recs[6000].output = 1_000_000_000_000;
    for r in &recs {
        ledger.add(r.consumer, r.entry, r.input, r.output, r.ms);
    }
    let total_input: u64 = recs.iter().map(|r| r.input).sum();
    let total_output: u64 = recs.iter().map(|r| r.output).sum();
    let total_cost: u128 = ledger.slots.values().flatten().map(|s| s.cost).sum();

    // Mixed batch sizes (1..1000), alternately to A and B; some batches carry copies of records
    // of other batches (sent or not yet) and of themselves; some are retried whole on the other
    // replica.
    struct Batch {
        records: Vec<usize>,
        replica: usize,
        retry: bool,
    }
    let mut order: Vec<usize> = (0..N).collect();
    rng.shuffle(&mut order);
    let fixed = [1, 500, 2, 1000, 37, 999, 1, 7, 1000, 250, 3, 640];
    let mut plan = Vec::new();
    let mut at = 0;
    while at < N {
        let k = plan.len();
        let want = fixed
            .get(k)
            .copied()
            .unwrap_or_else(|| 1 + rng.below(1000) as usize);
        let (copies, again) = (k % 3 == 1, k % 4 == 2);
        let room = 1000 - if copies { 5 } else { 0 } - usize::from(again);
        let size = want.min(room).min(N - at);
        let mut records = order[at..at + size].to_vec();
        at += size;
        if copies {
            records.extend((0..5).map(|_| rng.below(N as u64) as usize));
        }
        if again {
            records.push(records[0]);
        }
        plan.push(Batch {
            records,
            replica: k % 2,
            retry: k % 5 == 3,
        });
    }
    let sent: usize = plan
        .iter()
        .map(|b| b.records.len() * if b.retry { 2 } else { 1 })
        .sum();
    let bodies: Vec<Value> = plan
        .iter()
        .map(|b| Value::Array(b.records.iter().map(|&i| recs[i].json()).collect()))
        .collect();
    let replicas = [&a, &b];
    let accepted = AtomicU64::new(0);
    let duplicates = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..2 {
            let (plan, bodies, accepted, duplicates) = (&plan, &bodies, &accepted, &duplicates);
            scope.spawn(move || {
                for (batch, body) in plan.iter().zip(bodies).filter(|(b, _)| b.replica == thread) {
                    let n = batch.records.len() as u64;
                    let got = ingest(replicas[thread], body);
                    assert!(got.rejected.is_empty(), "{got:?}");
                    assert_eq!(got.accepted + got.duplicates, n, "{got:?}");
                    accepted.fetch_add(got.accepted, Ordering::Relaxed);
                    duplicates.fetch_add(got.duplicates, Ordering::Relaxed);
                    if batch.retry {
                        // Every record of it is recorded now: the retry changes nothing.
                        let again = ingest(replicas[1 - thread], body);
                        assert_eq!(again, ok(0, n), "whole-batch retry on the other replica");
                        duplicates.fetch_add(n, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    eprintln!(
        "{sent} records in {} batches (+ retries) in {:?}",
        plan.len(),
        started.elapsed()
    );
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        N as u64,
        "accepted over all answers"
    );
    assert_eq!(
        duplicates.load(Ordering::Relaxed),
        (sent - N) as u64,
        "duplicates over all answers"
    );
    // A duplicate with other counts changes nothing either.
    let mut changed = recs[0].clone();
    changed.input = 1;
    changed.output = 1;
    assert_eq!(ingest(&b, &changed.json()), ok(0, 1));
    assert_eq!(ingest(&a, &Value::Array(vec![changed.json()])), ok(0, 1));

    // Both replicas show exactly the sums.
    let cases = [
        ("alice", "ak", "a1"),
        ("alice", "ak", "a2"),
        ("alice", "ak", "a3"),
        ("bob", "bk", "a1"),
        ("bob", "bk", "b2"),
    ];
    for (name, service) in [("A", &a), ("B", &b)] {
        poll(
            Duration::from_secs(15),
            &format!("replica {name} shows the exact totals"),
            || {
                for (c, key, e) in cases {
                    let doc = usage_doc(service, key, "");
                    if doc["complete"] != true || doc["date"] != today.as_str() {
                        return Err(format!("{doc}"));
                    }
                    ledger.matches(&doc, c, e)?;
                }
                Ok(())
            },
        );
    }
    for (c, key, e) in cases {
        let doc = usage_doc(&a, key, &format!("?date={today}"));
        assert_eq!(doc["date"], today.as_str());
        ledger.matches(&doc, c, e).unwrap();
        let shown = entry_usage(&doc, e).unwrap();
        assert_eq!(shown.provider_name, format!("p-{e}"));
        assert_eq!(shown.limits, Value::Null, "{c}/{e} has no limits");
        assert_eq!(shown.remaining, Value::Null, "{c}/{e} has no limits");
        eprintln!("{c}/{e}: {}", shown.day);
    }
    // The one with 10¹² tokens at 2: far beyond what an i64 of 10⁻¹² holds (9.2 million).
    assert!(ledger.day("alice", "a3").cost > 2_000_000_000_000 * UNIT);
    // Yesterday: nothing that day; its month is this month unless today is the first.
    let yesterday = utc_date(now - 86_400_000);
    let doc = usage_doc(&b, "ak", &format!("?date={yesterday}"));
    assert_eq!(doc["date"], yesterday.as_str());
    for e in ["a1", "a2", "a3"] {
        let shown = entry_usage(&doc, e).unwrap();
        assert_eq!(shown.day, Agg::default(), "{e} yesterday: {doc}");
        let month = if yesterday[..7] == today[..7] {
            ledger.day("alice", e)
        } else {
            Agg::default()
        };
        assert_eq!(shown.month, month, "{e} month of {yesterday}");
    }
    // Metrics, summed over the replicas.
    let both = |series: &str| metric(&a, series) + metric(&b, series);
    assert_eq!(
        both(r#"uma_usage_records_total{result="accepted"}"#),
        N as f64
    );
    assert_eq!(
        both(r#"uma_usage_records_total{result="duplicate"}"#),
        (sent - N + 2) as f64
    );
    assert_eq!(both(r#"uma_usage_records_total{result="rejected"}"#), 0.0);
    assert_eq!(
        both(r#"uma_usage_tokens_total{direction="input"}"#),
        total_input as f64
    );
    assert_eq!(
        both(r#"uma_usage_tokens_total{direction="output"}"#),
        total_output as f64
    );
    let cost = both("uma_usage_cost_total");
    let exact = total_cost as f64 / UNIT as f64;
    assert!(
        (cost - exact).abs() <= exact * 1e-9,
        "uma_usage_cost_total {cost}, exact {}",
        decimal(total_cost)
    );
}

// =============================================================================================
// 2. Kong http-log

#[test]
fn kong_http_log_single_and_batched_with_bad_records() {
    let (midnight, now) = today_so_far(5);
    let redis = Redis::start();
    let seed = seed(&[
        consumer(
            "alice",
            "ak",
            &[
                entry("a1", "3e-8", "1.5e-7", ""),
                entry("a2", "0.000000075", "2", ""),
            ],
        ),
        consumer("bob", "bk", &[entry("b2", "2", "3e-8", "")]),
    ]);
    // Times spread over the whole day so far: remembered for a day.
    let service = serve(
        Some(&redis),
        "",
        &seed,
        Some(TOKEN),
        &[("UMA_USAGE__DEDUP_HOURS", "24")],
    );
    let mut ledger = Ledger::default();
    ledger.price("alice", "a1", "3e-8", "1.5e-7");
    ledger.price("alice", "a2", "0.000000075", "2");
    ledger.price("bob", "b2", "2", "3e-8");
    let early = midnight + (now - midnight) / 3;
    let late = now - 1_000;
    let usage = |p: i64, c: i64| {
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "time_per_token": 12.5, "cost": 99.75})
    };

    // One object, Kong's default: `consumer.username` wins over the header; Kong's cost ignored.
    let single = kong(
        Some("kong-req-0001"),
        Some("alice"),
        &[("x-consumer-username", "bob"), ("x-consumer-id", "a1")],
        usage(120, 30),
        early,
    );
    assert_eq!(ingest(&service, &single), ok(1, 0));
    ledger.add("alice", "a1", 120, 30, early);
    // Kong retries a failed POST: the same record again is a duplicate.
    assert_eq!(ingest(&service, &single), ok(0, 1));

    // A batch, as Kong's queue sends it, with bad records mixed in.
    let old = now - 25 * 3_600_000; // past the 24 h this service remembers
    let ahead = now + 10 * 60_000;
    let h = |user: &'static str, entry: &'static str| {
        vec![("x-consumer-username", user), ("x-consumer-id", entry)]
    };
    let batch = json!([
        // 0: no `consumer` (Kong did not authenticate): the header names it.
        kong(Some("kong-req-0002"), None, &h("bob", "b2"), usage(10, 5), late),
        // 1: the singular spelling of older Kong docs.
        kong(Some("kong-req-0003"), Some("alice"), &[("x-consumer-id", "a2")],
            json!({"prompt_token": 7, "completion_token": 8, "total_tokens": 15}), late),
        // 2..: each bad in one way.
        kong(None, Some("alice"), &[("x-consumer-id", "a1")], usage(1, 1), late),
        kong(Some("kong-req-0005"), None, &[("x-consumer-id", "a1")], usage(1, 1), late),
        kong(Some("kong-req-0006"), None, &h("mallory", "a1"), usage(1, 1), late),
        kong(Some("kong-req-0007"), Some("alice"), &[], usage(1, 1), late),
        kong(Some("kong-req-0008"), Some("alice"), &[("x-consumer-id", "b2")], usage(1, 1), late),
        kong(Some("kong-req-0009"), Some("alice"), &[("x-consumer-id", "a1")],
            json!({"prompt_tokens": -1, "completion_tokens": 1}), late),
        kong(Some("kong-req-0010"), Some("alice"), &[("x-consumer-id", "a1")],
            json!({"prompt_tokens": 1.5, "completion_tokens": 1}), late),
        kong(Some("kong-req-0011"), Some("alice"), &[("x-consumer-id", "a1")],
            json!({"prompt_tokens": 1, "completion_tokens": "12"}), late),
        kong(Some("kong-req-0012"), Some("alice"), &[("x-consumer-id", "a1")], usage(1, 1), old),
        kong(Some("kong-req-0013"), Some("alice"), &[("x-consumer-id", "a1")], usage(1, 1), ahead),
        42,
        {"request": {"id": "kong-req-0015", "headers": {"x-consumer-id": "a1"}},
         "consumer": {"username": "alice"}, "started_at": late},
        // 14: record 0 again, 15: the single object again: duplicates.
        kong(Some("kong-req-0002"), None, &h("bob", "b2"), usage(10, 5), late),
        kong(Some("kong-req-0001"), Some("alice"), &[("x-consumer-id", "a1")], usage(120, 30), early),
        // 16: bob's request id, but alice's: ids are per consumer.
        kong(Some("kong-req-0002"), Some("alice"), &[("x-consumer-id", "a1")], usage(1000, 2000), late),
        // 17: `consumer.username` wins over an unknown header name.
        kong(Some("kong-req-0018"), Some("alice"), &h("nobody-known", "a2"), usage(3, 4), early),
    ]);
    let got = ingest(&service, &batch);
    let reasons = [
        (2, "missing request_id"),
        (3, "missing consumer"),
        (4, "unknown consumer"),
        (5, "missing metadata_id"),
        (6, "entry not available to the consumer"),
        (7, "invalid token count"),
        (8, "invalid token count"),
        (9, "invalid token count"),
        (10, "time too old"),
        (11, "time in the future"),
        (12, "not a usage record"),
        (13, "not a usage record"),
    ];
    assert_eq!(
        got,
        Outcome {
            accepted: 4,
            duplicates: 2,
            rejected: reasons.iter().map(|(i, r)| (*i, (*r).to_owned())).collect(),
        }
    );
    ledger.add("bob", "b2", 10, 5, late);
    ledger.add("alice", "a2", 7, 8, late);
    ledger.add("alice", "a1", 1000, 2000, late);
    ledger.add("alice", "a2", 3, 4, early);
    // A one-element array of the whole batch's first record: a duplicate (index 0 within it).
    assert_eq!(ingest(&service, &json!([batch[0].clone()])), ok(0, 1));
    // A lone bad object answers 200 too, at index 0.
    assert_eq!(
        ingest(&service, &batch[5]),
        Outcome {
            accepted: 0,
            duplicates: 0,
            rejected: vec![(0, "missing metadata_id".to_owned())],
        }
    );

    poll(Duration::from_secs(10), "the Kong records' totals", || {
        for (c, key, e) in [
            ("alice", "ak", "a1"),
            ("alice", "ak", "a2"),
            ("bob", "bk", "b2"),
        ] {
            ledger.matches(&usage_doc(&service, key, ""), c, e)?;
        }
        Ok(())
    });
    // By hand: 120 × 3e-8 + 30 × 1.5e-7 + 1000 × 3e-8 + 2000 × 1.5e-7 = 0.0003381.
    assert_eq!(
        ledger.day("alice", "a1").cost,
        parse_cost("0.0003381").unwrap()
    );
    assert_eq!(record_results(&service), [5.0, 4.0, 13.0]);
}

// =============================================================================================
// 3. Budgets across replicas

#[test]
fn budgets_crossed_on_one_replica_refuse_on_the_other() {
    away_from_midnight();
    let redis = Redis::start();
    let seed = seed(&[
        consumer(
            "carol",
            "ck",
            &[
                entry("tok", "0", "0", ", limits: {tokens_per_day: 1000}"),
                entry("money", "0.01", "0.02", ", limits: {cost_per_day: 5.5}"),
                entry("monthly", "1", "0", ", limits: {cost_per_month: 2}"),
                entry(
                    "reqs",
                    "0",
                    "0",
                    ", limits: {requests_per_day: 1, tokens_per_day: 100}",
                ),
            ],
        ),
        consumer(
            "erin",
            "ek",
            &[entry("tok", "0", "0", ", limits: {tokens_per_day: 1000}")],
        ),
    ]);
    let mut config = String::new();
    for id in ["tok", "money", "monthly", "reqs"] {
        config.push_str(&format!(
            "[[routes]]\nprefix = \"/{id}\"\nmetadata_id = \"{id}\"\n\n"
        ));
    }
    config.push_str(
        "[[routes]]\nprefix = \"/locked\"\nmetadata_id = \"tok\"\nallow_groups = [\"nobody\"]\n",
    );
    let a = serve(Some(&redis), &config, &seed, Some(TOKEN), &[]);
    let b = serve(Some(&redis), &config, &seed, Some(TOKEN), &[]);
    let t = recent_ms();
    let time = rfc3339(t, true);
    let record = |id: &str, entry: &str, input: u64, output: u64| {
        native(id, "carol", entry, input, output, Some(&time))
    };
    // Waits until B's /auth on `uri` satisfies `check`; prints how long it took.
    let on_b = |what: &str, uri: &str, check: &dyn Fn(&Response) -> bool| -> Response {
        let (r, waited) = poll(Duration::from_secs(5), what, || {
            let r = auth(&b, "ck", uri);
            if check(&r) {
                Ok(r)
            } else {
                Err(format!("{r:?}"))
            }
        });
        eprintln!("{what}: seen on replica B after {waited:?}");
        r
    };

    // Before any usage: 200, with a member for each budget.
    let r = auth(&b, "ck", "/tok/chat");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-consumer-id"), Some("tok"));
    let p = policy(&r);
    assert_eq!(names(&p), BTreeSet::from(["tokens-day"]), "{r:?}");
    assert_eq!(param(&p, "tokens-day", "q"), 1000);
    assert_eq!(param(&p, "tokens-day", "w"), 86_400);
    let s = state(&r);
    assert_eq!(names(&s), BTreeSet::from(["tokens-day"]), "{r:?}");
    assert_eq!(param(&s, "tokens-day", "r"), 1000);
    let reset = param(&s, "tokens-day", "t");
    assert!(reset.abs_diff(secs_to_utc_midnight()) <= 2, "t={reset}");
    let r = auth(&b, "ck", "/money/chat");
    assert_eq!(r.status, 200, "{r:?}");
    let p = policy(&r);
    assert_eq!(names(&p), BTreeSet::from(["cost-day"]), "{r:?}");
    assert_eq!(param(&p, "cost-day", "q"), 5, "floor of 5.5");
    assert_eq!(param(&p, "cost-day", "w"), 86_400);
    assert_eq!(remaining(&r, "cost-day"), 5, "floor of 5.5");
    let r = auth(&b, "ck", "/monthly/chat");
    assert_eq!(r.status, 200, "{r:?}");
    let (to_month_end, month_len) = month_end();
    let p = policy(&r);
    assert_eq!(names(&p), BTreeSet::from(["cost-month"]), "{r:?}");
    assert_eq!(param(&p, "cost-month", "q"), 2);
    assert_eq!(param(&p, "cost-month", "w"), month_len);
    assert_eq!(remaining(&r, "cost-month"), 2);
    let reset = param(&state(&r), "cost-month", "t");
    assert!(
        reset.abs_diff(to_month_end) <= 2,
        "t={reset} vs {to_month_end}"
    );

    // tokens_per_day: 400 recorded on A; B's answers show 600 left.
    assert_eq!(ingest(&a, &record("t1", "tok", 300, 100)), ok(1, 0));
    on_b("600 tokens left", "/tok/chat", &|r| {
        r.status == 200 && remaining(r, "tokens-day") == 600
    });
    // Exactly the budget (≥ refuses): B refuses.
    assert_eq!(ingest(&a, &record("t2", "tok", 100, 500)), ok(1, 0));
    let r = on_b("tokens-day budget", "/tok/chat", &|r| r.status == 429);
    assert_budget_429(&r, secs_to_utc_midnight(), "tokens-day");
    assert_eq!(param(&policy(&r), "tokens-day", "q"), 1000);
    assert_eq!(remaining(&r, "tokens-day"), 0);
    // A refuses too; the other consumer's budget for the same entry id is its own.
    let (r, _) = poll(Duration::from_secs(5), "A refuses", || {
        let r = auth(&a, "ck", "/tok/chat");
        if r.status == 429 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_budget_429(&r, secs_to_utc_midnight(), "tokens-day on A");
    let r = auth(&b, "ek", "/tok/chat");
    assert_eq!(r.status, 200, "erin: {r:?}");
    assert_eq!(remaining(&r, "tokens-day"), 1000);
    // 401 and 403 win over the budget's 429.
    let r = auth(&b, "not-a-key", "/tok/chat");
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(message(&r), "Invalid authentication credentials");
    assert_eq!(r.header("x-uma-limit"), None);
    let r = auth(&b, "ck", "/locked/chat");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(message(&r), "You cannot consume this service");
    assert_eq!(r.header("x-uma-limit"), None);
    // A record arriving after the refusal (a call in flight) overshoots; nothing goes negative.
    assert_eq!(ingest(&a, &record("t3", "tok", 50, 0)), ok(1, 0));

    // cost_per_day 5.5 at 0.01 / 0.02: 3, then 4, then exactly 5.5.
    assert_eq!(ingest(&a, &record("m1", "money", 100, 100)), ok(1, 0));
    on_b("cost 3 of 5.5", "/money/chat", &|r| {
        r.status == 200 && remaining(r, "cost-day") == 2
    });
    let (doc, _) = poll(Duration::from_secs(5), "/api/usage shows cost 3", || {
        let doc = usage_doc(&b, "ck", "");
        let e = entry_usage(&doc, "money")?;
        if e.day.cost == 3 * UNIT {
            Ok(doc)
        } else {
            Err(format!("{doc}"))
        }
    });
    let money = entry_usage(&doc, "money").unwrap();
    assert_limits(&money.limits, &json!({"cost_per_day": 5.5}), "money");
    assert_eq!(money.remaining, json!({"cost_per_day": "2.5"}), "{doc}");
    assert_eq!(ingest(&a, &record("m2", "money", 100, 0)), ok(1, 0));
    on_b("cost 4 of 5.5", "/money/chat", &|r| {
        r.status == 200 && remaining(r, "cost-day") == 1
    });
    assert_eq!(ingest(&a, &record("m3", "money", 0, 75)), ok(1, 0));
    let r = on_b("cost-day budget", "/money/chat", &|r| r.status == 429);
    assert_budget_429(&r, secs_to_utc_midnight(), "cost-day");
    assert_eq!(param(&policy(&r), "cost-day", "q"), 5);
    assert_eq!(remaining(&r, "cost-day"), 0);

    // cost_per_month 2 at 1 per input token: refused until the month ends.
    assert_eq!(ingest(&a, &record("mo1", "monthly", 2, 0)), ok(1, 0));
    let r = on_b("cost-month budget", "/monthly/chat", &|r| r.status == 429);
    let (to_month_end, month_len) = month_end();
    assert_budget_429(&r, to_month_end, "cost-month");
    assert_eq!(param(&policy(&r), "cost-month", "w"), month_len);
    assert_eq!(remaining(&r, "cost-month"), 0);

    // Request limits come first: a request-limit 429 says so, also once the budget is spent.
    let r = auth(&b, "ck", "/reqs/chat");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(names(&policy(&r)), BTreeSet::from(["day", "tokens-day"]));
    assert_eq!(remaining(&r, "tokens-day"), 100);
    let r = auth(&b, "ck", "/reqs/chat");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json(), json!({"message": "API rate limit exceeded"}));
    assert_eq!(r.header("x-uma-limit"), Some("requests"), "{r:?}");
    assert_eq!(ingest(&a, &record("q1", "reqs", 60, 40)), ok(1, 0));
    let r = on_b("reqs budget spent too", "/reqs/chat", &|r| {
        r.status == 429 && remaining(r, "tokens-day") == 0
    });
    assert_eq!(r.json(), json!({"message": "API rate limit exceeded"}));
    assert_eq!(r.header("x-uma-limit"), Some("requests"), "{r:?}");

    // /api/usage: limits as in the seed, what remains (never negative), the exact figures.
    let (doc, _) = poll(Duration::from_secs(5), "/api/usage final", || {
        let doc = usage_doc(&a, "ck", "");
        let tok = entry_usage(&doc, "tok")?;
        let reqs = entry_usage(&doc, "reqs")?;
        if tok.day.tokens() == (450, 600, 0) && reqs.day.requests == 1 && reqs.day.input == 60 {
            Ok(doc)
        } else {
            Err(format!("{doc}"))
        }
    });
    assert_eq!(doc["complete"], true);
    let tok = entry_usage(&doc, "tok").unwrap();
    assert_limits(&tok.limits, &json!({"tokens_per_day": 1000}), "tok");
    assert_eq!(tok.remaining, json!({"tokens_per_day": 0}), "{doc}");
    let money = entry_usage(&doc, "money").unwrap();
    assert_eq!(money.day.tokens(), (200, 175, 55 * UNIT / 10), "{doc}");
    assert_eq!(money.remaining, json!({"cost_per_day": "0"}), "{doc}");
    let monthly = entry_usage(&doc, "monthly").unwrap();
    assert_limits(&monthly.limits, &json!({"cost_per_month": 2}), "monthly");
    assert_eq!(monthly.month.cost, 2 * UNIT);
    assert_eq!(monthly.remaining, json!({"cost_per_month": "0"}), "{doc}");
    let reqs = entry_usage(&doc, "reqs").unwrap();
    assert_limits(
        &reqs.limits,
        &json!({"requests_per_day": 1, "tokens_per_day": 100}),
        "reqs",
    );
    assert_eq!(
        reqs.remaining,
        json!({"requests_per_day": 0, "tokens_per_day": 0}),
        "{doc}"
    );
}

// =============================================================================================
// 4. Redis killed and restarted during ingest

#[test]
fn redis_killed_and_restarted_during_ingest_loses_and_doubles_nothing() {
    let (_, now) = today_so_far(3);
    let today = utc_date(now);
    let mut redis = Redis::start();
    let seed = seed(&[
        consumer(
            "alice",
            "ak",
            &[
                entry("a1", "0.000000075", "1.5e-7", ""),
                entry("a2", "3e-8", "2", ""),
            ],
        ),
        consumer("bob", "bk", &[entry("b1", "2", "0.000000075", "")]),
    ]);
    let env = [("UMA_REDIS__COMMAND_TIMEOUT_MS", "1000")];
    let a = serve(Some(&redis), "", &seed, Some(TOKEN), &env);
    let b = serve(Some(&redis), "", &seed, Some(TOKEN), &env);
    let mut ledger = Ledger::default();
    ledger.price("alice", "a1", "0.000000075", "1.5e-7");
    ledger.price("alice", "a2", "3e-8", "2");
    ledger.price("bob", "b1", "2", "0.000000075");

    let stop = AtomicBool::new(false);
    let batches = AtomicUsize::new(0);
    let unique: Mutex<Vec<Rec>> = Mutex::new(Vec::new());
    // Set when the sender ends, normally or by a failed assert, so waiting for it never hangs.
    let sender_done = AtomicBool::new(false);
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let wait_batches = |n: usize, what: &str| {
        poll(Duration::from_secs(20), what, || {
            let done = batches.load(Ordering::SeqCst);
            assert!(
                done >= n || !sender_done.load(Ordering::SeqCst),
                "{what}: the sender stopped after {done} batches"
            );
            if done >= n {
                Ok(())
            } else {
                Err(format!("{done} batches sent"))
            }
        });
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _done = Done(&sender_done);
            let mut rng = Rng(0x0a7a_9e42);
            let mut previous: Vec<Rec> = Vec::new();
            let mut k = 0usize;
            let pick = [("alice", "a1"), ("alice", "a2"), ("bob", "b1")];
            while !stop.load(Ordering::SeqCst) {
                let fresh: Vec<Rec> = (0..25)
                    .map(|j| {
                        let (consumer, entry) = pick[rng.below(3) as usize];
                        Rec {
                            consumer,
                            entry,
                            id: format!("out-{k}-{j}"),
                            input: rng.below(100_000),
                            output: rng.below(100_000),
                            ms: recent_ms(),
                            fraction: j % 2 == 0,
                        }
                    })
                    .collect();
                let mut records = fresh.clone();
                if k % 4 == 1 {
                    records.extend(previous.iter().take(5).cloned());
                }
                let body = Value::Array(records.iter().map(Rec::json).collect());
                let (first, other) = if k.is_multiple_of(2) {
                    (&a, &b)
                } else {
                    (&b, &a)
                };
                let got = ingest(first, &body);
                assert!(got.rejected.is_empty(), "batch {k}: {got:?}");
                assert_eq!(
                    got.accepted + got.duplicates,
                    records.len() as u64,
                    "batch {k}"
                );
                if k.is_multiple_of(3) {
                    // A retry on the other replica (as a shipper whose answer was lost would).
                    let again = ingest(other, &body);
                    assert!(again.rejected.is_empty(), "retry {k}: {again:?}");
                    assert_eq!(again.accepted + again.duplicates, records.len() as u64);
                }
                unique.lock().unwrap().extend(fresh.iter().cloned());
                previous = fresh;
                k += 1;
                batches.store(k, Ordering::SeqCst);
            }
        });
        wait_batches(8, "batches before the outage");
        redis.kill();
        wait_connected(&a, false);
        wait_connected(&b, false);
        // Down: /api/usage still answers, marked incomplete.
        for s in [&a, &b] {
            let doc = usage_doc(s, "ak", "");
            assert_eq!(doc["complete"], false, "Redis is down: {doc}");
            assert!(entry_usage(&doc, "a1").is_ok(), "{doc}");
        }
        let at = batches.load(Ordering::SeqCst);
        wait_batches(at + 8, "batches during the outage");
        redis.launch();
        wait_connected(&a, true);
        wait_connected(&b, true);
        let at = batches.load(Ordering::SeqCst);
        wait_batches(at + 8, "batches after the outage");
        stop.store(true, Ordering::SeqCst);
    });
    let unique = unique.into_inner().unwrap();
    for r in &unique {
        ledger.add(r.consumer, r.entry, r.input, r.output, r.ms);
    }
    eprintln!("{} unique records sent", unique.len());
    let cases = [
        ("alice", "ak", "a1"),
        ("alice", "ak", "a2"),
        ("bob", "bk", "b1"),
    ];
    let exact = |service: &Service| -> Result<(), String> {
        for (c, key, e) in cases {
            let doc = usage_doc(service, key, "");
            if doc["complete"] != true || doc["date"] != today.as_str() {
                return Err(format!("{doc}"));
            }
            ledger.matches(&doc, c, e)?;
        }
        Ok(())
    };
    for (name, s) in [("A", &a), ("B", &b)] {
        poll(
            Duration::from_secs(20),
            &format!("replica {name}: every unique record exactly once"),
            || exact(s),
        );
    }
    // And it stays so: no late second write of a buffered batch.
    std::thread::sleep(Duration::from_millis(1_500));
    for s in [&a, &b] {
        exact(s).unwrap();
        assert_eq!(metric(s, "uma_usage_dropped_total"), 0.0);
    }
}

// =============================================================================================
// 5. The ingest token and the body bounds

#[test]
fn ingest_needs_its_token_and_bounds_its_body() {
    let (_, now) = today_so_far(2);
    let redis = Redis::start();
    let seed = seed(&[consumer(
        "alice",
        "ak",
        &[entry("a1", "3e-8", "1.5e-7", "")],
    )]);
    // The token from the TOML file this time.
    let service = serve(
        Some(&redis),
        "[usage]\ntoken = \"toml-token-42\"\n",
        &seed,
        None,
        &[],
    );
    let time = rfc3339(now - 1_000, false);
    let rec = |id: &str| native(id, "alice", "a1", 1, 2, Some(&time));
    let good = "Bearer toml-token-42";
    let body = rec("auth-0").to_string();
    for authorization in [
        None,
        Some("Bearer wrong-token"),
        Some("Bearer toml-token-4"),
        Some("Bearer toml-token-421"),
        Some("Bearer "),
        Some("toml-token-42"),
        Some("Basic toml-token-42"),
    ] {
        let r = post_usage(&service, authorization, body.as_bytes());
        assert_eq!(r.status, 401, "{authorization:?}: {r:?}");
        assert_eq!(
            r.json(),
            json!({"message": "Invalid usage token"}),
            "{authorization:?}"
        );
    }
    // Refused calls recorded nothing: the record is new now.
    assert_eq!(
        outcome(&post_usage(&service, Some(good), body.as_bytes())),
        ok(1, 0)
    );
    let mut recorded = 1u64;

    // 1001 records: 400 and nothing recorded (the first 1000 are new afterwards).
    let big: Vec<Value> = (0..1001).map(|i| rec(&format!("big-{i}"))).collect();
    let r = post_usage(
        &service,
        Some(good),
        Value::Array(big.clone()).to_string().as_bytes(),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!message(&r).is_empty(), "{r:?}");
    let r = post_usage(
        &service,
        Some(good),
        Value::Array(big[..1000].to_vec()).to_string().as_bytes(),
    );
    assert_eq!(outcome(&r), ok(1000, 0));
    recorded += 1000;

    // Not JSON: 400 and nothing recorded.
    let one = rec("json-0").to_string();
    let two = format!("[{one},{}]", rec("json-1"));
    for bad in [
        String::new(),
        "not json".to_owned(),
        format!("[{one},"),
        format!("{one} trailing"),
        format!("{two}]"),
        format!("{{\"request_id\":\"json-0\",{}", &one[1..one.len() - 1]),
    ] {
        let r = post_usage(&service, Some(good), bad.as_bytes());
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
        assert!(!message(&r).is_empty(), "{r:?}");
    }
    assert_eq!(
        outcome(&post_usage(&service, Some(good), two.as_bytes())),
        ok(2, 0)
    );
    recorded += 2;

    // 10 MB (over the default 8 MiB): 413 and nothing recorded.
    let padded = |prefix: &str, pad: usize| -> String {
        let records: Vec<Value> = (0..1000)
            .map(|i| {
                let mut v = rec(&format!("{prefix}-{i}"));
                v["pad"] = json!("x".repeat(pad));
                v
            })
            .collect();
        Value::Array(records).to_string()
    };
    let huge = padded("huge", 10_000);
    assert!(huge.len() > 10_000_000, "{}", huge.len());
    let r = post_usage(&service, Some(good), huge.as_bytes());
    assert_eq!(r.status, 413, "{:?}", (r.status, &r.body));
    assert_eq!(r.json(), json!({"message": "Request body too large"}));
    let unpadded = padded("huge", 0);
    assert_eq!(
        outcome(&post_usage(&service, Some(good), unpadded.as_bytes())),
        ok(1000, 0)
    );
    recorded += 1000;
    // Just under 8 MiB is read.
    let fits = padded("fits", 8_200);
    assert!(
        fits.len() > 8_000_000 && fits.len() < 8_388_608,
        "{}",
        fits.len()
    );
    assert_eq!(
        outcome(&post_usage(&service, Some(good), fits.as_bytes())),
        ok(1000, 0)
    );
    recorded += 1000;

    poll(
        Duration::from_secs(10),
        "exactly the accepted records",
        || {
            let doc = usage_doc(&service, "ak", "");
            let day = entry_usage(&doc, "a1")?.day;
            let want = (
                recorded,
                2 * recorded,
                u128::from(recorded) * units("3.3e-7"),
            );
            if day.tokens() == want {
                Ok(())
            } else {
                Err(format!("{day} want {want:?}"))
            }
        },
    );

    // Without a token configured the endpoint is off: 404, whatever is sent.
    let off = serve(None, "", &seed, None, &[]);
    for authorization in [None, Some("Bearer toml-token-42"), Some("Bearer ")] {
        let r = post_usage(&off, authorization, body.as_bytes());
        assert_eq!(r.status, 404, "{authorization:?}: {r:?}");
    }
}

// =============================================================================================
// 6. Validation of native records and the time window

#[test]
fn native_records_are_checked_one_by_one_and_time_is_bounded_by_dedup_hours() {
    let now = now_ms();
    let seed = format!(
        "{}{}routes:\n  - name: r\n    paths: [/r]\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n{}plugins:\n  - name: user-metadata\n    config:\n      metadata_list:\n{}",
        seed(&[
            consumer("alice", "ak", &[entry("a1", "3e-8", "1.5e-7", "")]),
            consumer("bob", "bk", &[entry("b1", "3e-8", "1.5e-7", "")]),
        ]),
        "  - username: rita\n    keyauth_credentials: [{key: rk}]\n",
        entry("rx", "0.001", "0.002", ""),
        entry("gx", "0.001", "0.002", "").replacen("            ", "        ", 1),
    );
    let service = serve(None, "", &seed, Some(TOKEN), &[]);
    let at = |ms: i64| rfc3339(ms, false);
    let t = at(now - 1_000);
    let hour = 3_600_000;
    let minute = 60_000;
    let cases: Vec<(Value, Option<&str>)> = vec![
        (native("v-0", "alice", "a1", 1, 1, Some(&t)), None),
        (
            json!({"consumer": "alice", "metadata_id": "a1", "input_tokens": 1, "output_tokens": 1}),
            Some("missing request_id"),
        ),
        (
            json!({"request_id": "v-2", "metadata_id": "a1", "input_tokens": 1, "output_tokens": 1}),
            Some("missing consumer"),
        ),
        (
            native("v-3", "mallory", "a1", 1, 1, Some(&t)),
            Some("unknown consumer"),
        ),
        (
            json!({"request_id": "v-4", "consumer": "alice", "input_tokens": 1, "output_tokens": 1}),
            Some("missing metadata_id"),
        ),
        (
            native("v-5", "alice", "b1", 1, 1, Some(&t)),
            Some("entry not available to the consumer"),
        ),
        (
            native("v-6", "alice", "nope", 1, 1, Some(&t)),
            Some("entry not available to the consumer"),
        ),
        (
            json!({"request_id": "v-7", "consumer": "alice", "metadata_id": "a1", "input_tokens": -1, "output_tokens": 1}),
            Some("invalid token count"),
        ),
        (
            json!({"request_id": "v-8", "consumer": "alice", "metadata_id": "a1", "input_tokens": 1, "output_tokens": 2.5}),
            Some("invalid token count"),
        ),
        (
            json!({"request_id": "v-9", "consumer": "alice", "metadata_id": "a1", "input_tokens": "3", "output_tokens": 1}),
            Some("invalid token count"),
        ),
        (
            json!({"request_id": "v-10", "consumer": "alice", "metadata_id": "a1", "input_tokens": 1_000_000_000_001u64, "output_tokens": 1}),
            Some("invalid token count"),
        ),
        (
            json!({"request_id": "v-11", "consumer": "alice", "metadata_id": "a1",
                "usage": {"prompt_tokens": -5, "completion_tokens": 1}}),
            Some("invalid token count"),
        ),
        (
            native("v-12", "alice", "a1", 1, 1, Some("yesterday at noon")),
            Some("invalid time"),
        ),
        (
            native("v-13", "alice", "a1", 1, 1, Some("2026-13-45T00:00:00Z")),
            Some("invalid time"),
        ),
        (json!("a string"), Some("not a usage record")),
        (json!([1, 2]), Some("not a usage record")),
        (
            json!({"request_id": "v-16", "consumer": "alice", "metadata_id": "a1"}),
            Some("not a usage record"),
        ),
        // The default window is 6 hours; 5 minutes ahead is the most tolerated.
        (
            native("v-17", "alice", "a1", 1, 1, Some(&at(now - 7 * hour))),
            Some("time too old"),
        ),
        (
            native("v-18", "alice", "a1", 1, 1, Some(&at(now + 10 * minute))),
            Some("time in the future"),
        ),
        (
            native("v-19", "alice", "a1", 1, 1, Some(&at(now - 5 * hour))),
            None,
        ),
        (
            native("v-20", "alice", "a1", 1, 1, Some(&at(now + 3 * minute))),
            None,
        ),
        // A consumer without a list of its own: a route's list or the global list.
        (native("v-21", "rita", "rx", 1, 1, Some(&t)), None),
        (native("v-22", "rita", "gx", 1, 1, Some(&t)), None),
        (
            native("v-23", "rita", "a1", 1, 1, Some(&t)),
            Some("entry not available to the consumer"),
        ),
        // The largest count is allowed.
        (
            native("v-24", "bob", "b1", 1_000_000_000_000, 0, Some(&t)),
            None,
        ),
    ];
    let batch = Value::Array(cases.iter().map(|(v, _)| v.clone()).collect());
    let expected = Outcome {
        accepted: cases.iter().filter(|(_, r)| r.is_none()).count() as u64,
        duplicates: 0,
        rejected: cases
            .iter()
            .enumerate()
            .filter_map(|(i, (_, r))| r.map(|r| (i as u64, r.to_owned())))
            .collect(),
    };
    assert_eq!(ingest(&service, &batch), expected);
    // The rejected ones were not recorded as seen: fixed, they are accepted.
    assert_eq!(
        ingest(&service, &native("v-7", "alice", "a1", 1, 1, Some(&t))),
        ok(1, 0)
    );
    assert_eq!(
        ingest(&service, &native("v-17", "alice", "a1", 1, 1, Some(&t))),
        ok(1, 0)
    );

    // usage.dedup_hours = 1: two hours ago is too old, half an hour is not.
    let short = serve(
        None,
        "",
        &seed,
        Some(TOKEN),
        &[("UMA_USAGE__DEDUP_HOURS", "1")],
    );
    let got = ingest(
        &short,
        &json!([
            native("w-0", "alice", "a1", 1, 1, Some(&at(now - 2 * hour))),
            native("w-1", "alice", "a1", 1, 1, Some(&at(now - 30 * minute))),
        ]),
    );
    assert_eq!(
        got,
        Outcome {
            accepted: 1,
            duplicates: 0,
            rejected: vec![(0, "time too old".to_owned())],
        }
    );
}

// =============================================================================================
// 7. Embedded mode

#[test]
fn embedded_mode_ingests_bills_deduplicates_and_enforces_budgets() {
    let (_, now) = today_so_far(2);
    let seed = seed(&[consumer(
        "dan",
        "dk",
        &[
            entry("e1", "0.001", "0.002", ", limits: {tokens_per_day: 500}"),
            entry("e2", "0.5", "0", ", limits: {cost_per_day: 1}"),
        ],
    )]);
    let config = "[[routes]]\nprefix = \"/e1\"\nmetadata_id = \"e1\"\n\n[[routes]]\nprefix = \"/e2\"\nmetadata_id = \"e2\"\n";
    let service = serve(None, config, &seed, Some(TOKEN), &[]);
    let mut allowed_e1 = 0u64;
    let mut call = |uri: &str| {
        let r = auth(&service, "dk", uri);
        if r.status == 200 && uri == "/e1/x" {
            allowed_e1 += 1;
        }
        r
    };
    let r = call("/e1/x");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(remaining(&r, "tokens-day"), 500);
    let t = rfc3339(now - 1_000, true);
    let rec = |id: &str, entry: &str, i: u64, o: u64| native(id, "dan", entry, i, o, Some(&t));
    // Duplicates within the batch and on a resend.
    let batch = json!([
        rec("d1", "e1", 100, 100),
        rec("d2", "e1", 50, 50),
        rec("d1", "e1", 100, 100)
    ]);
    assert_eq!(ingest(&service, &batch), ok(2, 1));
    assert_eq!(ingest(&service, &rec("d2", "e1", 50, 50)), ok(0, 1));
    let (r, _) = poll(Duration::from_secs(5), "200 tokens left", || {
        let r = call("/e1/x");
        if r.status == 200 && remaining(&r, "tokens-day") == 200 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(param(&policy(&r), "tokens-day", "q"), 500);
    // A record without `time` counts at its arrival; it reaches the budget exactly.
    let untimed = json!({"request_id": "d3", "consumer": "dan", "metadata_id": "e1",
        "input_tokens": 150, "output_tokens": 50});
    assert_eq!(ingest(&service, &untimed), ok(1, 0));
    let (r, _) = poll(Duration::from_secs(5), "tokens-day budget", || {
        let r = call("/e1/x");
        if r.status == 429 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_budget_429(&r, secs_to_utc_midnight(), "embedded tokens-day");
    assert_eq!(remaining(&r, "tokens-day"), 0);
    // Cost: 0.5 of 1 leaves r=0 (floor) but is allowed; 1 of 1 refuses.
    assert_eq!(ingest(&service, &rec("d4", "e2", 1, 0)), ok(1, 0));
    let (r, _) = poll(Duration::from_secs(5), "half the cost budget", || {
        let r = call("/e2/x");
        if r.status == 200 && remaining(&r, "cost-day") == 0 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(param(&policy(&r), "cost-day", "q"), 1);
    assert_eq!(ingest(&service, &rec("d5", "e2", 1, 0)), ok(1, 0));
    let (r, _) = poll(Duration::from_secs(5), "cost-day budget", || {
        let r = call("/e2/x");
        if r.status == 429 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_budget_429(&r, secs_to_utc_midnight(), "embedded cost-day");
    let doc = usage_doc(&service, "dk", "");
    assert_eq!(doc["complete"], true, "embedded counts are complete: {doc}");
    let e1 = entry_usage(&doc, "e1").unwrap();
    assert_eq!(e1.day.tokens(), (300, 200, units("0.7")), "{doc}");
    assert_eq!(e1.day.requests, allowed_e1, "allowed /auth calls: {doc}");
    assert_eq!(e1.month, e1.day);
    assert_eq!(sum_slots(&e1.slots), e1.day);
    assert_eq!(e1.remaining, json!({"tokens_per_day": 0}), "{doc}");
    assert_limits(&e1.limits, &json!({"tokens_per_day": 500}), "e1");
    let e2 = entry_usage(&doc, "e2").unwrap();
    assert_eq!(e2.day.tokens(), (2, 0, UNIT), "{doc}");
    assert_eq!(e2.remaining, json!({"cost_per_day": "0"}), "{doc}");
    assert_eq!(record_results(&service), [5.0, 2.0, 0.0]);
}

#[test]
fn openai_and_anthropic_usage_objects_with_cache_prices_and_time_offsets() {
    let (midnight, now) = today_so_far(4);
    let seed = seed(&[consumer(
        "sam",
        "sk",
        &[
            entry(
                "cached",
                "0.000003",
                "0.000015",
                ", cache_read_input_token_cost: 0.0000003",
            ),
            entry("plain", "0.000001", "0.000002", ""),
        ],
    )]);
    let service = serve(
        None,
        "",
        &seed,
        Some(TOKEN),
        &[("UMA_USAGE__DEDUP_HOURS", "24")],
    );
    let t0 = midnight + (now - midnight) / 2;
    let z = rfc3339(t0, true);
    let seoul = rfc3339_offset(t0, 9);
    let new_york = rfc3339_offset(t0, -5);
    let with_usage = |id: &str, entry: &str, usage: Value, time: &str| json!({"request_id": id, "consumer": "sam", "metadata_id": entry, "usage": usage, "time": time});
    let batch = json!([
        // OpenAI: cached tokens are part of prompt_tokens, priced at the cache price.
        with_usage(
            "o1",
            "cached",
            json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
            "prompt_tokens_details": {"cached_tokens": 400}}),
            &seoul
        ),
        // Anthropic: input excludes both cache fields; all count as input, reads at the cache price.
        with_usage(
            "a1",
            "cached",
            json!({"input_tokens": 100, "output_tokens": 50,
            "cache_creation_input_tokens": 30, "cache_read_input_tokens": 500}),
            &new_york
        ),
        with_usage(
            "o2",
            "cached",
            json!({"prompt_tokens": 7, "completion_tokens": 3}),
            &z
        ),
        // Without a cache price, cache reads are priced as input.
        with_usage(
            "a2",
            "plain",
            json!({"input_tokens": 10, "output_tokens": 5,
            "cache_creation_input_tokens": 20, "cache_read_input_tokens": 70}),
            &z
        ),
        with_usage(
            "o3",
            "plain",
            json!({"prompt_tokens": 50, "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 50}}),
            &seoul
        ),
        with_usage(
            "a3",
            "plain",
            json!({"input_tokens": 1, "output_tokens": 1}),
            &new_york
        ),
    ]);
    assert_eq!(ingest(&service, &batch), ok(6, 0));
    let p = units;
    let c_cost = 600 * p("0.000003")
        + 400 * p("0.0000003")
        + 200 * p("0.000015")
        + 130 * p("0.000003")
        + 500 * p("0.0000003")
        + 50 * p("0.000015")
        + 7 * p("0.000003")
        + 3 * p("0.000015");
    let n_cost = 100 * p("0.000001")
        + 5 * p("0.000002")
        + 50 * p("0.000001")
        + p("0.000001")
        + p("0.000002");
    // By hand: 0.00492 + 0.00129 + 0.000066 and 0.00011 + 0.00005 + 0.000003.
    assert_eq!(decimal(c_cost), "0.006276");
    assert_eq!(decimal(n_cost), "0.000163");
    let doc = usage_doc(&service, "sk", "");
    let slot = slot_of(t0);
    for (id, input, output, cost) in [("cached", 1637, 253, c_cost), ("plain", 151, 6, n_cost)] {
        let e = entry_usage(&doc, id).unwrap();
        let want = Agg {
            requests: 0,
            input,
            output,
            cost,
        };
        assert_eq!(e.day, want, "{id}: {doc}");
        assert_eq!(e.month, want, "{id}: {doc}");
        // All at one instant, written in three offsets: one UTC slot.
        assert_eq!(e.slots[slot], want, "{id} in T{}: {doc}", slot + 1);
        assert_eq!(e.limits, Value::Null);
        assert_eq!(e.remaining, Value::Null);
    }
    assert_eq!(
        entry_usage(&doc, "cached").unwrap().day.cost,
        parse_cost("0.006276").unwrap()
    );
}

// =============================================================================================
// 8. Validation by `check`

struct Checked {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Checked {
    fn problems(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect()
    }
}

fn check(seed: &str, config: Option<&str>) -> Checked {
    let dir = tempfile::tempdir().expect("temp dir");
    let seed_path = write_file(dir.path(), "kong.yaml", seed);
    let mut command = std::process::Command::new(BIN);
    command.arg("check").arg("--seed").arg(&seed_path);
    if let Some(config) = config {
        command
            .arg("--config")
            .arg(write_file(dir.path(), "config.toml", config));
    }
    let out = command.current_dir(dir.path()).output().expect("run check");
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "check exits 0 or 1: {:?}",
        out.status
    );
    Checked {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A route named `name` on `path` with its own metadata list.
fn route(name: &str, path: &str, entries: &[String]) -> String {
    format!(
        "  - name: {name}\n    paths: [{path}]\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n{}",
        entries.concat()
    )
}

fn global(entries: &[String]) -> String {
    let mut out =
        String::from("plugins:\n  - name: user-metadata\n    config:\n      metadata_list:\n");
    for e in entries {
        out.push_str(&e.replacen("            ", "        ", 1));
    }
    out
}

#[test]
fn check_refuses_13_decimal_places_and_ambiguous_shared_entries() {
    let list0 = "consumers[0].plugins[0].config.metadata_list[0]";
    let user = |entries: &[String]| seed(&[consumer("u", "k", entries)]);
    // The cache price is held to the 12-place rule, with the field named.
    for value in ["0.0000000000001", "1e-13"] {
        let out = check(
            &user(&[entry(
                "e",
                "0.001",
                "0.002",
                &format!(", cache_read_input_token_cost: {value}"),
            )]),
            None,
        );
        assert!(!out.ok, "{value} passed:\n{}", out.stdout);
        assert!(
            out.problems().iter().any(|l| l
                .contains(&format!("{list0}.cache_read_input_token_cost"))
                && l.contains("12 decimal places")),
            "{value}:\n{}",
            out.stderr
        );
    }
    let out = check(
        &user(&[entry(
            "e",
            "0.001",
            "0.002",
            ", cache_read_input_token_cost: -1",
        )]),
        None,
    );
    assert!(!out.ok);
    assert!(
        out.problems()
            .iter()
            .any(|l| l.contains(&format!("{list0}.cache_read_input_token_cost"))),
        "{}",
        out.stderr
    );
    let out = check(
        &user(&[entry(
            "e",
            "0.001",
            "0.002",
            ", cache_read_input_token_cost: 3e-8",
        )]),
        None,
    );
    assert!(out.ok, "{}", out.stderr);
    // A price in a route's list too.
    let text = format!(
        "{}routes:\n{}",
        user(&[entry("e", "0.001", "0.002", "")]),
        route("r", "/r", &[entry("pricey", "0.0000000000001", "0", "")])
    );
    let out = check(&text, None);
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.problems().iter().any(|l| l
            .contains("routes[0].plugins[0].config.metadata_list[0].input_cost_per_token")
            && l.contains("12 decimal places")),
        "{}",
        out.stderr
    );

    // One id in two route lists, or a route list and the global list: identical, or refused.
    let shared = entry("shared", "0.001", "0.002", "");
    let other = entry("shared", "0.001", "0.003", "");
    let base = user(&[entry("e", "0.001", "0.002", "")]);
    let routes = |a: &String, b: &String| {
        format!(
            "{base}routes:\n{}{}",
            route("r1", "/r1", std::slice::from_ref(a)),
            route(
                "r2",
                "/r2",
                &[entry("other-entry", "0", "0", ""), b.clone()]
            )
        )
    };
    assert!(
        check(&routes(&shared, &shared), None).ok,
        "identical copies are fine"
    );
    let out = check(&routes(&shared, &other), None);
    assert!(
        !out.ok,
        "two route lists disagree on `shared`:\n{}",
        out.stdout
    );
    assert!(
        out.problems().iter().any(|l| l.contains("shared")),
        "the problem names the entry:\n{}",
        out.stderr
    );
    let with_global = |a: &String, b: &String| {
        format!(
            "{base}routes:\n{}{}",
            route("r1", "/r1", std::slice::from_ref(a)),
            global(std::slice::from_ref(b))
        )
    };
    assert!(check(&with_global(&shared, &shared), None).ok);
    let out = check(&with_global(&shared, &other), None);
    assert!(
        !out.ok,
        "a route list and the global list disagree:\n{}",
        out.stdout
    );
    assert!(
        out.problems().iter().any(|l| l.contains("shared")),
        "{}",
        out.stderr
    );
    // Consumers' own lists are theirs: per-user prices for one id are fine.
    let own = seed(&[
        consumer("u", "k", std::slice::from_ref(&shared)),
        consumer("v", "k2", std::slice::from_ref(&other)),
    ]);
    assert!(check(&own, None).ok, "consumers' own lists may differ");

    // usage.dedup_hours is 1..=168; unknown [usage] keys are errors.
    for (config, ok) in [
        (
            "[usage]\ndedup_hours = 168\nbudget_refresh_ms = 250\nmax_pending_records = 1000000\nmax_body_bytes = 8388608\n",
            true,
        ),
        ("[usage]\ndedup_hours = 1\n", true),
        ("[usage]\ndedup_hours = 0\n", false),
        ("[usage]\ndedup_hours = 169\n", false),
        ("[usage]\ndedup_hourz = 6\n", false),
    ] {
        let out = check(&base, Some(config));
        assert_eq!(out.ok, ok, "{config}\n{}", out.stderr);
        if !ok {
            assert!(
                out.stderr.contains("usage.dedup_hour"),
                "{config}: the key is named:\n{}",
                out.stderr
            );
        }
    }
}
