//! The billing export (SPEC §10 `GET /admin/usage?month=YYYY-MM`) against the real binary: usage
//! records posted to `/usage` and allowed `/auth` calls for two consumers, two entries and several
//! days, read back through the admin listener as JSON and as CSV, and compared with sums computed
//! here in integers (prices in units of 10⁻¹²). With a real `redis-server` (consumers found by SCAN,
//! plus a month written straight into Redis's key layout) and in embedded mode (from memory).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::money::{UNIT, decimal, units};
use common::redis::Redis;
use common::{Response, Service, away_from_midnight, request};
use serde_json::{Value, json};

const USAGE_TOKEN: &str = "usage-ingest-token-for-the-export";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdefghijklmnop";
const TDL: &str = "{T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}";

/// A username that CSV must quote (a comma and quotes: printable ASCII, allowed by SPEC §3).
const BOB: &str = "bob \"the builder\", jr";

/// (entry id, input price, output price).
type Priced = (&'static str, &'static str, &'static str);

/// (consumer, key, entries): each consumer has its own prices.
const CONSUMERS: [(&str, &str, [Priced; 2]); 2] = [
    (
        "alice",
        "ak",
        [("e1", "3e-8", "1.5e-7"), ("e2", "0.000002", "0.0000081")],
    ),
    (BOB, "bk", [("e1", "0.1", "0.3"), ("e2", "7e-12", "1")]),
];

// ---------------------------------------------------------------------------------------------
// The service

fn seed() -> String {
    let mut out = String::from("consumers:\n");
    for (name, key, entries) in CONSUMERS {
        out.push_str(&format!(
            "  - username: '{name}'\n    keyauth_credentials: [{{key: {key}}}]\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n"
        ));
        for (id, input, output) in entries {
            out.push_str(&format!(
                "            - {{id: {id}, provider_name: p-{id}, tdl_matrix: {TDL}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: {input}, output_cost_per_token: {output}}}\n"
            ));
        }
    }
    out
}

const CONFIG: &str = "[[routes]]\nprefix = \"/e1\"\nmetadata_id = \"e1\"\n\n[[routes]]\nprefix = \"/e2\"\nmetadata_id = \"e2\"\n";

/// The service (on `redis`, embedded when `None`) with the admin API on a port of its own, ready.
fn serve(redis: Option<&Redis>) -> (Service, SocketAddr) {
    let url = redis.map(Redis::url).unwrap_or_default();
    let env = [
        ("UMA_REDIS__URL", url.as_str()),
        ("UMA_REDIS__COMMAND_TIMEOUT_MS", "2000"),
        ("UMA_USAGE__TOKEN", USAGE_TOKEN),
        // Records may be up to a week old: enough for days of two months near a month's start.
        ("UMA_USAGE__DEDUP_HOURS", "168"),
        ("UMA_ADMIN__TOKEN", ADMIN_TOKEN),
        // Port 0: the address is read from the log, so no other test can take it first.
        ("UMA_ADMIN__LISTEN", "127.0.0.1:0"),
    ];
    let service = Service::with_files_env(CONFIG, &seed(), &env);
    wait_until(&service, "ready", || {
        service.get("/readyz", &[]).status == 200
    });
    if redis.is_some() {
        wait_until(&service, "connected to Redis", || {
            service.get("/readyz", &[]).json()["redis"]["connected"] == true
        });
    }
    let admin = service.admin_addr();
    (service, admin)
}

/// A hang guard, never a timing assert.
fn wait_until(service: &Service, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never {what}:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET` on the admin listener, with `Authorization: Bearer <token>` when given.
fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>, accept: Option<&str>) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    if let Some(a) = accept {
        headers.push(("Accept", a));
    }
    request(admin, "GET", path, &headers)
}

fn export_json(admin: SocketAddr, query: &str) -> Value {
    let r = admin_get(
        admin,
        &format!("/admin/usage{query}"),
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn export_csv(admin: SocketAddr, query: &str) -> String {
    let r = admin_get(
        admin,
        &format!("/admin/usage{query}"),
        Some(ADMIN_TOKEN),
        Some("text/csv"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/csv")),
        "{r:?}"
    );
    r.body
}

/// `POST /usage` with the usage token; asserts every record was accepted.
fn post_records(service: &Service, records: &[Value]) {
    let body = Value::Array(records.to_vec()).to_string();
    let head = format!(
        "POST /usage HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {USAGE_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let r = common::raw(service.addr, format!("{head}{body}").as_bytes(), false);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"accepted": records.len(), "duplicates": 0, "rejected": []}),
        "every record accepted"
    );
}

// ---------------------------------------------------------------------------------------------
// What the export must say, computed here

fn prices(consumer: &str, entry: &str) -> (u128, u128) {
    let (_, _, entries) = CONSUMERS
        .iter()
        .find(|(name, _, _)| *name == consumer)
        .expect("a seed consumer");
    let (_, input, output) = entries
        .iter()
        .find(|(id, _, _)| *id == entry)
        .expect("a seed entry");
    (units(input), units(output))
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Cell {
    requests: u64,
    input: u64,
    output: u64,
    cost: u128,
}

impl Cell {
    fn add(&mut self, other: Cell) {
        self.requests += other.requests;
        self.input += other.input;
        self.output += other.output;
        self.cost += other.cost;
    }

    fn json(&self) -> Value {
        json!({"requests": self.requests, "input_tokens": self.input,
            "output_tokens": self.output, "cost": decimal(self.cost)})
    }
}

/// entry → date → sums.
type Entries = BTreeMap<String, BTreeMap<String, Cell>>;

/// month → consumer → entry → date → sums.
#[derive(Debug, Default)]
struct Ledger(BTreeMap<String, BTreeMap<String, Entries>>);

impl Ledger {
    fn add(&mut self, consumer: &str, entry: &str, date: &str, cell: Cell) {
        self.0
            .entry(date[..7].to_owned())
            .or_default()
            .entry(consumer.to_owned())
            .or_default()
            .entry(entry.to_owned())
            .or_default()
            .entry(date.to_owned())
            .or_default()
            .add(cell);
    }

    fn months(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// The JSON document of one month.
    fn json(&self, month: &str) -> Value {
        let empty = BTreeMap::new();
        let consumers: Vec<Value> = self
            .0
            .get(month)
            .unwrap_or(&empty)
            .iter()
            .map(|(name, entries)| {
                let entries: Vec<Value> = entries
                    .iter()
                    .map(|(id, days)| {
                        let mut total = Cell::default();
                        let days: Vec<Value> = days
                            .iter()
                            .map(|(date, cell)| {
                                total.add(*cell);
                                let mut day = cell.json();
                                day["date"] = json!(date);
                                day
                            })
                            .collect();
                        json!({"id": id, "days": days, "total": total.json()})
                    })
                    .collect();
                json!({"username": name, "entries": entries})
            })
            .collect();
        json!({"month": month, "timezone": "UTC", "complete": true, "consumers": consumers})
    }

    /// The CSV of one month: the header, then one row per (consumer, entry, day), CRLF.
    fn csv(&self, month: &str) -> String {
        let quote = |s: &str| {
            if s.contains([',', '"', '\r', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        };
        let mut out =
            String::from("username,entry,date,requests,input_tokens,output_tokens,cost\r\n");
        for (name, entries) in self.0.get(month).into_iter().flatten() {
            for (id, days) in entries {
                for (date, c) in days {
                    out.push_str(&format!(
                        "{},{},{date},{},{},{},{}\r\n",
                        quote(name),
                        quote(id),
                        c.requests,
                        c.input,
                        c.output,
                        decimal(c.cost)
                    ));
                }
            }
        }
        out
    }
}

fn utc_date(ts: jiff::Timestamp) -> String {
    ts.strftime("%Y-%m-%d").to_string()
}

/// Posts records for both consumers and entries on three days (now, a day ago, six days ago:
/// near a month's start they fall in two months) and makes allowed `/auth` calls; returns what
/// the export must show.
fn use_the_service(service: &Service) -> Ledger {
    away_from_midnight();
    let mut ledger = Ledger::default();
    let now = jiff::Timestamp::now();
    let hour = jiff::SignedDuration::from_hours(1);
    let times = [
        now - jiff::SignedDuration::from_mins(2),
        now - hour * 25,
        now - hour * (6 * 24 + 1),
    ];
    let mut records = Vec::new();
    let mut n = 0u64;
    for (name, _, entries) in CONSUMERS {
        for (e, (entry, _, _)) in entries.iter().enumerate() {
            for (d, time) in times.iter().enumerate() {
                // Not every cell: bob's e2 only on the first day.
                if name == BOB && *entry == "e2" && d > 0 {
                    continue;
                }
                // Two records in some cells, so the export sums within a day.
                for k in 0..=(d + e) % 2 {
                    n += 1;
                    let (input, output) = (100 * n + 7 * k as u64, 3 * n + 1);
                    let (pin, pout) = prices(name, entry);
                    records.push(json!({"request_id": format!("r-{n}"), "consumer": name,
                        "metadata_id": entry, "input_tokens": input, "output_tokens": output,
                        "time": time.to_string()}));
                    let cost = u128::from(input) * pin + u128::from(output) * pout;
                    ledger.add(
                        name,
                        entry,
                        &utc_date(*time),
                        Cell {
                            requests: 0,
                            input,
                            output,
                            cost,
                        },
                    );
                }
            }
        }
    }
    post_records(service, &records);
    // Allowed calls, counted on today's date.
    let today = utc_date(jiff::Timestamp::now());
    for (key, consumer, uri, calls) in [
        ("ak", "alice", "/e1/chat", 3),
        ("ak", "alice", "/e2/chat", 1),
        ("bk", BOB, "/e1/chat", 2),
    ] {
        let entry = &uri[1..3];
        for _ in 0..calls {
            let r = service.auth(key, uri);
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.header("x-consumer-id"), Some(entry));
        }
        let cell = Cell {
            requests: calls,
            ..Cell::default()
        };
        ledger.add(consumer, entry, &today, cell);
    }
    assert_eq!(
        utc_date(jiff::Timestamp::now()),
        today,
        "the calls stayed on one date"
    );
    ledger
}

/// JSON and CSV of every month the ledger has, and of the current month by default.
fn assert_export_matches(admin: SocketAddr, ledger: &Ledger) {
    for month in ledger.months() {
        let query = format!("?month={month}");
        assert_eq!(
            export_json(admin, &query),
            ledger.json(&month),
            "{month} JSON"
        );
        assert_eq!(export_csv(admin, &query), ledger.csv(&month), "{month} CSV");
    }
    let current = jiff::Timestamp::now().strftime("%Y-%m").to_string();
    assert_eq!(
        export_json(admin, ""),
        ledger.json(&current),
        "no month: the current one"
    );
    // A month with nothing in it.
    assert_eq!(export_json(admin, "?month=1999-01"), ledger.json("1999-01"));
    assert_eq!(
        export_csv(admin, "?month=1999-01"),
        "username,entry,date,requests,input_tokens,output_tokens,cost\r\n"
    );
}

fn assert_admin_checks(admin: SocketAddr) {
    let r = admin_get(admin, "/admin/usage", None, None);
    assert_eq!(r.status, 401, "no token: {r:?}");
    let r = admin_get(
        admin,
        "/admin/usage",
        Some("not-the-admin-token-at-all-0000000"),
        Some("text/csv"),
    );
    assert_eq!(r.status, 401, "wrong token: {r:?}");
    assert!(!r.body.contains("username,"), "no export without the token");
    for bad in ["2026-13", "2026-00", "2026-1", "2026-12-01", "december"] {
        let r = admin_get(
            admin,
            &format!("/admin/usage?month={bad}"),
            Some(ADMIN_TOKEN),
            None,
        );
        assert_eq!(r.status, 400, "month={bad}: {r:?}");
        assert_eq!(r.json()["message"], "month must be YYYY-MM", "month={bad}");
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn the_billing_export_from_redis_adds_up_exactly_per_consumer_entry_and_day() {
    let redis = Redis::start();
    let (service, admin) = serve(Some(&redis));
    let mut ledger = use_the_service(&service);

    // Another month, written straight into the key layout (README, Key layout): alice's e1 on the
    // last day of February, and a consumer with calls only (found by its TDL day index).
    for args in [
        vec![
            "HSET",
            "uma:usage:{alice}:e1:2001-02-28",
            "d:i",
            "5",
            "d:o",
            "7",
            "d:c",
            "123",
            "d:C",
            "2",
        ],
        vec!["SADD", "uma:usage-entries:{alice}:2001-02-28", "e1"],
        vec![
            "HSET",
            "uma:usage-month:{alice}:e1:2001-02",
            "i",
            "5",
            "o",
            "7",
            "c",
            "123",
            "C",
            "2",
        ],
        vec!["HSET", "uma:tdl:{alice}:e1:2001-02-28", "T3", "4"],
        vec!["SADD", "uma:tdl-entries:{alice}:2001-02-28", "e1"],
        vec![
            "HSET",
            "uma:tdl:{carol}:e9:2001-02-03",
            "T1",
            "1",
            "T12",
            "2",
        ],
        vec!["SADD", "uma:tdl-entries:{carol}:2001-02-03", "e9"],
        // Another month's keys of a username that holds the month's text.
        vec!["SADD", "uma:tdl-entries:{x:2001-02-01}:2001-03-01", "e1"],
        vec!["HSET", "uma:tdl:{x:2001-02-01}:e1:2001-03-01", "T1", "1"],
    ] {
        redis.cli(&args);
    }
    let cell = |requests, input, output, cost| Cell {
        requests,
        input,
        output,
        cost,
    };
    ledger.add("alice", "e1", "2001-02-28", cell(4, 5, 7, 2 * UNIT + 123));
    ledger.add("carol", "e9", "2001-02-03", cell(3, 0, 0, 0));
    assert!(ledger.months().len() >= 2, "{:?}", ledger.months());

    assert_export_matches(admin, &ledger);
    assert_admin_checks(admin);
    let csv = export_csv(admin, "?month=2001-02");
    assert!(
        csv.ends_with(
            "\r\nalice,e1,2001-02-28,4,5,7,2.000000000123\r\ncarol,e9,2001-02-03,3,0,0,0\r\n"
        ),
        "{csv}"
    );
}

#[test]
fn the_billing_export_in_embedded_mode_comes_from_memory() {
    let (service, admin) = serve(None);
    let ledger = use_the_service(&service);
    let doc = export_json(admin, "");
    assert_eq!(doc["complete"], true);
    assert!(
        doc["consumers"].as_array().is_some_and(|c| c.len() == 2),
        "{doc}"
    );
    assert_export_matches(admin, &ledger);
    assert_admin_checks(admin);
}

#[test]
fn with_redis_down_the_export_says_incomplete_and_refuses_csv() {
    let mut redis = Redis::start();
    let (service, admin) = serve(Some(&redis));
    away_from_midnight();
    redis.kill();
    // An allowed call and a record while Redis is gone: this replica holds both.
    let r = service.auth("ak", "/e1/chat");
    assert_eq!(r.status, 200, "a seed key is served without Redis: {r:?}");
    post_records(
        &service,
        &[
            json!({"request_id": "down-1", "consumer": "alice", "metadata_id": "e1",
            "input_tokens": 40, "output_tokens": 2}),
        ],
    );
    let (pin, pout) = prices("alice", "e1");
    let today = utc_date(jiff::Timestamp::now());
    let mut ledger = Ledger::default();
    let cell = Cell {
        requests: 1,
        input: 40,
        output: 2,
        cost: 40 * pin + 2 * pout,
    };
    ledger.add("alice", "e1", &today, cell);
    let mut expected = ledger.json(&today[..7]);
    expected["complete"] = json!(false);
    assert_eq!(export_json(admin, ""), expected, "what this replica holds");
    let r = admin_get(admin, "/admin/usage", Some(ADMIN_TOKEN), Some("text/csv"));
    assert_eq!(r.status, 503, "an incomplete CSV is not served: {r:?}");
    assert!(!r.body.contains("username,"), "{r:?}");
}
