//! The Redis tier against real `redis-server` processes: seed copies and operator records, counters
//! exactly once in both modes, and faults (kill, restart, SIGSTOP, absent at start, SIGTERM).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

/// One GET on a fresh connection (the shared client retries reads a signal interrupted).
fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers)
}

/// [`send`] for a running service.
trait Client {
    fn call(&self, path: &str, headers: &[(&str, &str)]) -> Response;

    fn call_auth(&self, key: &str, uri: &str) -> Response {
        self.call("/auth", &[("apikey", key), ("X-Forwarded-Uri", uri)])
    }
}

impl Client for Service {
    fn call(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        send(self.addr, path, headers)
    }
}

const USER1_COUNTER: &str = "uma:tdl:{user1-client}:kt-midm-base:*";

fn service(redis: &Redis, extra: &[(&str, &str)]) -> Service {
    let url = redis.url();
    let mut env = vec![("UMA_REDIS__URL", url.as_str())];
    env.extend_from_slice(extra);
    let service = Service::bundled_with_env(&env);
    wait_connected(&service, true);
    service
}

fn readyz_connected(service: &Service) -> Option<bool> {
    let r = service.call("/readyz", &[]);
    r.json()["redis"]["connected"].as_bool()
}

fn wait_connected(service: &Service, connected: bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if readyz_connected(service) == Some(connected) {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("/readyz never reported connected={connected}");
}

/// Sum of a consumer's counters over every day (a test may cross midnight).
fn total(redis: &Redis, pattern: &str) -> u64 {
    let keys = redis.cli(&["KEYS", pattern]);
    keys.lines()
        .filter(|k| !k.is_empty())
        .map(|k| redis.counter_total(k))
        .sum()
}

fn allowed(service: &Service) -> u16 {
    service.call_auth(USER1_KEY, "/midm-base/chat").status
}

#[test]
fn seed_copies_are_written_with_a_ttl_and_operator_records_win() {
    let redis = Redis::start();
    let service = service(
        &redis,
        &[
            ("UMA_REDIS__CACHE_TTL_SECS", "120"),
            ("UMA_CACHE__LOCAL_TTL_MS", "100"),
        ],
    );
    assert!(redis.wait_for(Duration::from_secs(3), |r| {
        r.cli(&["EXISTS", "uma:consumer:{user1-client}"]) == "1"
    }));
    let ttl: i64 = redis
        .cli(&["TTL", "uma:consumer:{user1-client}"])
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 120, "ttl {ttl}");
    let user1_hash = std::process::Command::new(BIN)
        .args(["hash-key", USER1_KEY])
        .output()
        .unwrap();
    let user1_hash = String::from_utf8(user1_hash.stdout).unwrap();
    let key_record = format!("uma:key:{}", user1_hash.trim());
    assert_eq!(redis.cli(&["GET", &key_record]), "user1-client");
    let key_ttl: i64 = redis.cli(&["TTL", &key_record]).parse().unwrap();
    assert!(key_ttl > 0 && key_ttl <= 120);
    // No plain key anywhere in Redis.
    for key in redis.cli(&["KEYS", "*"]).lines() {
        assert!(
            !key.contains(USER1_KEY) && !key.contains(ADMIN_KEY),
            "{key}"
        );
    }
    let record = redis.cli(&["GET", "uma:consumer:{user1-client}"]);
    assert!(!record.contains(USER1_KEY));
    let parsed: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(parsed["metadata_list"][0]["id"], "kt-midm-base");

    // An operator takes the record over: SET without a TTL. It is served after the local TTL.
    let changed = record.replace(
        "\"provider_name\":\"kt\"",
        "\"provider_name\":\"kt-operator\"",
    );
    redis.cli(&["SET", "uma:consumer:{user1-client}", &changed]);
    std::thread::sleep(Duration::from_millis(250));
    let r = service.call_auth(USER1_KEY, "/midm-base/chat");
    assert_eq!(r.header("x-user-provider"), Some("kt-operator"), "{r:?}");

    // An operator adds a key of their own (no TTL): it works without being in the seed.
    let new_hash = std::process::Command::new(BIN)
        .args(["hash-key", "operator-made-key"])
        .output()
        .unwrap();
    let new_key_record = format!(
        "uma:key:{}",
        String::from_utf8(new_hash.stdout).unwrap().trim()
    );
    redis.cli(&["SET", &new_key_record, "admin-client"]);
    let r = service.call_auth("operator-made-key", "/gpt4o/chat");
    assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"), "{r:?}");

    // A seed copy (with a TTL) of a key the running seed does not have is not honoured: revoked.
    let stale_hash = std::process::Command::new(BIN)
        .args(["hash-key", "deleted-from-seed"])
        .output()
        .unwrap();
    let stale_record = format!(
        "uma:key:{}",
        String::from_utf8(stale_hash.stdout).unwrap().trim()
    );
    redis.cli(&["SET", &stale_record, "admin-client", "EX", "600"]);
    assert_eq!(
        service.call_auth("deleted-from-seed", "/gpt4o/chat").status,
        401
    );
}

#[test]
fn a_restart_rewrites_seed_copies_but_never_operator_records() {
    let redis = Redis::start();
    redis.cli(&[
        "SET",
        "uma:consumer:{user1-client}",
        "{\"username\":\"user1-client\",\"custom_id\":\"old\"}",
        "EX",
        "600",
    ]);
    redis.cli(&[
        "SET",
        "uma:consumer:{admin-client}",
        "{\"username\":\"admin-client\",\"custom_id\":\"mine\"}",
    ]);
    let service = service(&redis, &[]);
    assert!(redis.wait_for(Duration::from_secs(3), |r| {
        r.cli(&["GET", "uma:consumer:{user1-client}"])
            .contains("client-001")
    }));
    let admin = redis.cli(&["GET", "uma:consumer:{admin-client}"]);
    assert!(
        admin.contains("\"mine\""),
        "operator record overwritten: {admin}"
    );
    assert_eq!(redis.cli(&["TTL", "uma:consumer:{admin-client}"]), "-1");
    let r = service.call_auth(ADMIN_KEY, "/gpt4o/chat");
    // The operator's record has no metadata list of its own and no route list applies: 403.
    assert_eq!(r.status, 403, "{r:?}");
    let r = service.call(
        "/auth",
        &[
            ("apikey", ADMIN_KEY),
            ("X-Forwarded-Uri", "/api/user-metadata"),
        ],
    );
    assert_eq!(r.header("x-consumer-custom-id"), Some("mine"), "{r:?}");
}

#[test]
fn corrupt_records_fall_back_to_the_seed() {
    let redis = Redis::start();
    let service = service(&redis, &[("UMA_CACHE__LOCAL_TTL_MS", "50")]);
    assert!(redis.wait_for(Duration::from_secs(3), |r| {
        r.cli(&["EXISTS", "uma:consumer:{user1-client}"]) == "1"
    }));
    for corrupt in [
        "{broken json",
        "{\"username\":\"user1-client\",\"metadata_list\":[{\"id\":\"x\"}]}",
        "[1,2,3]",
    ] {
        redis.cli(&["SET", "uma:consumer:{user1-client}", corrupt]);
        std::thread::sleep(Duration::from_millis(80));
        let r = service.call_auth(USER1_KEY, "/midm-base/chat");
        assert_eq!(r.status, 200, "{corrupt}: {r:?}");
        assert_eq!(r.header("x-user-provider"), Some("kt"));
    }
    redis.cli(&["DEL", "uma:consumer:{user1-client}"]);
    redis.cli(&["HSET", "uma:consumer:{user1-client}", "wrong", "type"]);
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(allowed(&service), 200);
    let metrics = service.call("/metrics", &[]).body;
    let corrupt: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("uma_redis_corrupt_records_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(corrupt >= 4.0, "{metrics}");
}

fn counts_exactly(mode: &str) {
    let redis = Redis::start();
    let service = service(
        &redis,
        &[
            ("UMA_TDL__MODE", mode),
            ("UMA_TDL__FLUSH_INTERVAL_MS", "50"),
        ],
    );
    for i in 1..=60u64 {
        assert_eq!(allowed(&service), 200);
        if mode == "sync" && i % 20 == 0 {
            // Sync: the increment is in Redis before the 200 is sent.
            assert_eq!(total(&redis, USER1_COUNTER), i);
        }
    }
    for _ in 0..5 {
        assert_eq!(service.call_auth(USER1_KEY, "/gpt4o/chat").status, 403);
        assert_eq!(
            service.call_auth("wrong-key", "/midm-base/chat").status,
            401
        );
    }
    assert!(redis.wait_for(Duration::from_secs(3), |r| total(r, USER1_COUNTER) == 60));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(total(&redis, USER1_COUNTER), 60);
    assert_eq!(
        redis.cli(&["KEYS", "uma:tdl:{admin-client}*"]),
        "",
        "denied calls count nothing"
    );
    let ttl: i64 = redis
        .cli(&["TTL", &redis.cli(&["KEYS", USER1_COUNTER])])
        .parse()
        .unwrap();
    assert!(
        ttl > 34 * 86_400 && ttl <= 35 * 86_400,
        "retention ttl {ttl}"
    );
    let tdl = service
        .call("/api/tdl-matrix", &[("apikey", USER1_KEY)])
        .json();
    let usage: u64 = tdl["entries"][0]["usage"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(usage, 60);
}

#[test]
fn async_mode_counts_every_allowed_call_exactly_once() {
    counts_exactly("async");
}

#[test]
fn sync_mode_counts_every_allowed_call_exactly_once() {
    counts_exactly("sync");
}

#[test]
fn two_instances_add_up() {
    let redis = Redis::start();
    let a = service(&redis, &[]);
    let b = service(&redis, &[("UMA_TDL__MODE", "sync")]);
    for _ in 0..40 {
        assert_eq!(allowed(&a), 200);
        assert_eq!(allowed(&b), 200);
    }
    assert!(redis.wait_for(Duration::from_secs(3), |r| total(r, USER1_COUNTER) == 80));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(total(&redis, USER1_COUNTER), 80);
}

/// Calls `/auth` in a loop on another thread until stopped; returns (calls, non-200s, slowest).
struct Stream {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<(u64, Vec<u16>, Duration)>,
}

impl Stream {
    fn start(addr: std::net::SocketAddr) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let (stop2, calls2) = (stop.clone(), calls.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = send(
                    addr,
                    "/auth",
                    &[
                        ("apikey", USER1_KEY),
                        ("X-Forwarded-Uri", "/midm-base/chat"),
                    ],
                );
                slowest = slowest.max(started.elapsed());
                if r.status != 200 {
                    failures.push(r.status);
                }
                n += 1;
                calls2.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            (n, failures, slowest)
        });
        Stream {
            stop,
            calls,
            thread,
        }
    }

    fn wait_calls(&self, at_least: u64) {
        while self.calls.load(Ordering::Relaxed) < at_least {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> (u64, Vec<u16>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn killing_and_restarting_redis_loses_nothing() {
    let mut redis = Redis::start();
    let service = service(&redis, &[("UMA_CACHE__LOCAL_TTL_MS", "100")]);
    let stream = Stream::start(service.addr);
    stream.wait_calls(50);
    redis.kill();
    let down = wait_connected(&service, false);
    assert!(
        down < Duration::from_millis(1200),
        "outage seen after {down:?}"
    );
    stream.wait_calls(stream.calls.load(Ordering::Relaxed) + 100);
    redis.launch();
    let up = wait_connected(&service, true);
    assert!(
        up < Duration::from_millis(1200),
        "recovery seen after {up:?}"
    );
    stream.wait_calls(stream.calls.load(Ordering::Relaxed) + 50);
    let (calls, failures, slowest) = stream.finish();
    assert!(
        failures.is_empty(),
        "non-200 answers during the outage: {failures:?}"
    );
    // Not a speed test: a call that waited on the dead Redis would take seconds, not milliseconds.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest call {slowest:?}"
    );
    assert!(
        redis.wait_for(Duration::from_secs(5), |r| total(r, USER1_COUNTER) == calls),
        "{} of {calls}",
        total(&redis, USER1_COUNTER)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(total(&redis, USER1_COUNTER), calls);
}

#[test]
fn a_hung_redis_neither_stalls_calls_nor_doubles_counts() {
    for mode in ["async", "sync"] {
        let redis = Redis::start();
        let service = service(
            &redis,
            &[
                ("UMA_TDL__MODE", mode),
                ("UMA_CACHE__LOCAL_TTL_MS", "100"),
                ("UMA_TDL__FLUSH_INTERVAL_MS", "20"),
            ],
        );
        let stream = Stream::start(service.addr);
        stream.wait_calls(40);
        redis.freeze();
        wait_connected(&service, false);
        stream.wait_calls(stream.calls.load(Ordering::Relaxed) + 80);
        redis.thaw();
        wait_connected(&service, true);
        stream.wait_calls(stream.calls.load(Ordering::Relaxed) + 40);
        let (calls, failures, slowest) = stream.finish();
        assert!(failures.is_empty(), "{mode}: {failures:?}");
        assert!(
            slowest < Duration::from_millis(500),
            "{mode}: slowest call {slowest:?}"
        );
        assert!(
            redis.wait_for(Duration::from_secs(5), |r| total(r, USER1_COUNTER) >= calls),
            "{mode}"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            total(&redis, USER1_COUNTER),
            calls,
            "{mode}: counted exactly once"
        );
    }
}

#[test]
fn redis_absent_at_start_then_started() {
    let mut redis = Redis::not_started();
    let url = redis.url();
    let service = Service::bundled_with_env(&[("UMA_REDIS__URL", url.as_str())]);
    assert_eq!(readyz_connected(&service), Some(false));
    assert_eq!(
        service.call("/readyz", &[]).json()["redis"]["configured"],
        true
    );
    // Redis down is no reason to be unready (once the first check has said it is down).
    let started = Instant::now();
    while service.call("/readyz", &[]).status != 200 && started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = service.call("/readyz", &[]);
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json()["redis"]["seed_copies"], "pending");
    for _ in 0..25 {
        assert_eq!(allowed(&service), 200, "seed keys are served without Redis");
    }
    // A key in no local source cannot be decided without Redis.
    let r = service.call_auth("never-seen-key", "/midm-base/chat");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["message"], "Metadata store unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    redis.launch();
    let up = wait_connected(&service, true);
    assert!(up < Duration::from_millis(1200), "{up:?}");
    assert!(redis.wait_for(Duration::from_secs(3), |r| total(r, USER1_COUNTER) == 25));
    assert_eq!(
        service
            .call_auth("never-seen-key", "/midm-base/chat")
            .status,
        401
    );
    // The copies are written once Redis is there.
    assert!(redis.wait_for(Duration::from_secs(5), |r| {
        r.cli(&["EXISTS", "uma:consumer:{user1-client}"]) == "1"
    }));
    let started = Instant::now();
    while service.call("/readyz", &[]).json()["redis"]["seed_copies"] != "written"
        && started.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        service.call("/readyz", &[]).json()["redis"]["seed_copies"],
        "written"
    );
}

#[test]
fn sigterm_writes_pending_increments() {
    let redis = Redis::start();
    // A flush interval longer than the test: only the final flush can write these.
    let service = service(&redis, &[("UMA_TDL__FLUSH_INTERVAL_MS", "600000")]);
    for _ in 0..30 {
        assert_eq!(allowed(&service), 200);
    }
    assert_eq!(total(&redis, USER1_COUNTER), 0);
    let tdl = service
        .call("/api/tdl-matrix", &[("apikey", USER1_KEY)])
        .json();
    let pending: u64 = tdl["entries"][0]["usage"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(pending, 30, "pending increments are shown");
    let status = service.terminate(Duration::from_secs(8)).expect("exit");
    assert!(status.success());
    assert_eq!(total(&redis, USER1_COUNTER), 30);
}

#[test]
fn sigterm_with_redis_down_still_exits_zero() {
    let mut redis = Redis::start();
    let service = service(
        &redis,
        &[
            ("UMA_TDL__FLUSH_INTERVAL_MS", "600000"),
            ("UMA_TDL__SHUTDOWN_FLUSH_MS", "500"),
        ],
    );
    for _ in 0..5 {
        assert_eq!(allowed(&service), 200);
    }
    redis.kill();
    let started = Instant::now();
    let status = service.terminate(Duration::from_secs(8)).expect("exit");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[test]
fn unknown_keys_are_cached_negatively() {
    let redis = Redis::start();
    let service = service(&redis, &[]);
    let before = redis.command_calls("get");
    for _ in 0..50 {
        assert_eq!(
            service.call_auth("flood-key", "/midm-base/chat").status,
            401
        );
    }
    let asked = redis.command_calls("get") - before;
    assert!(asked <= 2, "{asked} GETs for 50 calls with one bad key");
}

#[test]
fn a_cold_lookup_on_a_hung_redis_answers_within_the_timeout() {
    let redis = Redis::start();
    let service = service(&redis, &[("UMA_CACHE__LOCAL_TTL_MS", "1")]);
    assert_eq!(allowed(&service), 200);
    let sleeper = {
        let port = redis.port.to_string();
        std::thread::spawn(move || {
            let _ = std::process::Command::new("redis-cli")
                .args(["-p", &port, "DEBUG", "SLEEP", "2"])
                .output();
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let r = service.call_auth(ADMIN_KEY, "/gpt4o/chat");
    assert_eq!(r.status, 200, "a seed key is served from the seed");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    sleeper.join().unwrap();
}

/// The stored form of a key, as the service computes it.
fn hash_of(key: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args(["hash-key", key])
        .output()
        .expect("hash-key");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Today in UTC (the bundled config's zone).
fn today() -> jiff::civil::Date {
    jiff::tz::TimeZone::UTC
        .to_datetime(jiff::Timestamp::now())
        .date()
}

/// A consumer's counters in Redis over every day, skipping keys that are not counter hashes.
fn counted(redis: &Redis, consumer: &str) -> u64 {
    let keys = redis.cli(&["KEYS", &format!("uma:tdl:{{{consumer}}}:*")]);
    keys.lines()
        .filter(|k| !k.is_empty() && redis.cli(&["TYPE", k]) == "hash")
        .map(|k| redis.counter_total(k))
        .sum()
}

/// The instance id the service logs at start (its ledger keys end with it).
fn instance_of(service: &Service) -> String {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Some(id) = service
            .logs()
            .split("instance=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        {
            return id.to_owned();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no instance id logged:\n{}", service.logs());
}

fn metric(service: &Service, name: &str) -> f64 {
    service
        .call("/metrics", &[])
        .body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `/api/tdl-matrix` of a key: (complete, date, per-entry slot counts).
fn tdl(service: &Service, key: &str) -> (bool, String, Vec<(String, Vec<u64>)>) {
    let r = service.call("/api/tdl-matrix", &[("apikey", key)]);
    assert_eq!(r.status, 200, "{r:?}");
    let doc = r.json();
    let entries = doc["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{doc}"))
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap().to_owned();
            let slots = (1..=12)
                .map(|i| e["usage"][format!("T{i}")].as_u64().unwrap())
                .collect();
            (id, slots)
        })
        .collect();
    let complete = doc["complete"]
        .as_bool()
        .unwrap_or_else(|| panic!("no complete flag: {doc}"));
    (complete, doc["date"].as_str().unwrap().to_owned(), entries)
}

fn tdl_sum(entries: &[(String, Vec<u64>)], id: &str) -> u64 {
    entries
        .iter()
        .filter(|(e, _)| e == id)
        .flat_map(|(_, slots)| slots)
        .sum()
}

/// Every slot of every entry of `before` is at most what `after` shows (same day).
fn never_less(
    before: &(bool, String, Vec<(String, Vec<u64>)>),
    after: &(bool, String, Vec<(String, Vec<u64>)>),
) {
    if before.1 != after.1 {
        return; // a new day starts from zero
    }
    for (id, slots) in &before.2 {
        let now = after
            .2
            .iter()
            .find(|(e, _)| e == id)
            .unwrap_or_else(|| panic!("{id} vanished: {before:?} -> {after:?}"));
        for (was, is) in slots.iter().zip(&now.1) {
            assert!(is >= was, "{id} went backwards: {before:?} -> {after:?}");
        }
    }
}

const STALE_USER1: &str = r#"{"username":"user1-client","custom_id":"stale-copy","groups":["openai-allowed","midm-allowed"],"metadata_list":null}"#;

#[test]
fn stale_seed_copies_never_stand_in_for_the_running_seed() {
    let redis = Redis::start();
    let key_record = format!("uma:key:{}", hash_of(USER1_KEY));
    // Copies an older seed (or another replica) left: user1's key given to admin-client, and a
    // user1 record with other groups.
    redis.cli(&["SET", &key_record, "admin-client", "EX", "600"]);
    redis.cli(&[
        "SET",
        "uma:consumer:{user1-client}",
        STALE_USER1,
        "EX",
        "600",
    ]);
    // Writes stall for 3 s: the start-up rewrite of the copies times out.
    redis.cli(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    let service = service(&redis, &[]);
    let check = |service: &Service| {
        let r = service.call_auth(USER1_KEY, "/gpt4o/chat");
        assert_eq!(r.status, 403, "user1 is not in openai-allowed: {r:?}");
        let r = service.call_auth(USER1_KEY, "/midm-base/chat");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-consumer-username"), Some("user1-client"));
        assert_eq!(r.header("x-consumer-custom-id"), Some("client-001"));
        assert_eq!(r.header("x-consumer-groups"), Some("midm-allowed"));
        assert_eq!(r.header("x-consumer-id"), Some("kt-midm-base"));
    };
    check(&service);
    // The answers above were given while the stale copies were still all Redis had.
    assert_eq!(redis.cli(&["GET", &key_record]), "admin-client");
    assert!(
        redis
            .cli(&["GET", "uma:consumer:{user1-client}"])
            .contains("stale-copy")
    );
    // Once writes go through again, the failed start-up rewrite is retried until it succeeds.
    assert!(
        redis.wait_for(Duration::from_secs(10), |r| {
            r.cli(&["GET", &key_record]) == "user1-client"
                && r.cli(&["GET", "uma:consumer:{user1-client}"])
                    .contains("client-001")
        }),
        "copies not rewritten: {} / {}",
        redis.cli(&["GET", &key_record]),
        redis.cli(&["GET", "uma:consumer:{user1-client}"])
    );
    let ttl: i64 = redis.cli(&["TTL", &key_record]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 3600, "a seed copy keeps its TTL: {ttl}");
    check(&service);
    // Another replica (an older seed) writes its copies again: still the running seed answers.
    redis.cli(&["SET", &key_record, "admin-client", "EX", "600"]);
    redis.cli(&[
        "SET",
        "uma:consumer:{user1-client}",
        STALE_USER1,
        "EX",
        "600",
    ]);
    std::thread::sleep(Duration::from_millis(50));
    let fresh = Service::bundled_with_env(&[
        ("UMA_REDIS__URL", redis.url().as_str()),
        ("UMA_CACHE__LOCAL_TTL_MS", "1"),
        ("UMA_REDIS__COMMAND_TIMEOUT_MS", "1000"),
    ]);
    wait_connected(&fresh, true);
    check(&fresh);
    // An operator record (no TTL) does win: the operator gives the key to admin-client.
    redis.cli(&["SET", &key_record, "admin-client"]);
    let started = Instant::now();
    let mut r = fresh.call_auth(USER1_KEY, "/gpt4o/chat");
    while r.status != 200 && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        r = fresh.call_auth(USER1_KEY, "/gpt4o/chat");
    }
    assert_eq!(
        r.header("x-consumer-username"),
        Some("admin-client"),
        "{r:?}"
    );
}

#[test]
fn readyz_waits_for_the_seed_copies_but_not_for_a_redis_outage() {
    let redis = Redis::start();
    redis.cli(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    // A command timeout longer than the pause: the copies wait in Redis instead of failing.
    let url = redis.url();
    let service = Service::bundled_with_env(&[
        ("UMA_REDIS__URL", url.as_str()),
        ("UMA_REDIS__COMMAND_TIMEOUT_MS", "10000"),
    ]);
    wait_connected(&service, true);
    let r = service.call("/readyz", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["ready"], false);
    assert_eq!(r.json()["redis"]["seed_copies"], "pending");
    // Evidence that this was asked before the copies were written.
    assert_eq!(redis.cli(&["EXISTS", "uma:consumer:{user1-client}"]), "0");
    // Seed keys are served meanwhile.
    assert_eq!(allowed(&service), 200);
    let started = Instant::now();
    let ready = loop {
        let r = service.call("/readyz", &[]);
        if r.status == 200 || started.elapsed() > Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready.status, 200, "{ready:?}");
    let body = ready.json();
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["redis"]["configured"], true, "{body}");
    assert_eq!(body["redis"]["connected"], true, "{body}");
    assert_eq!(body["redis"]["seed_copies"], "written", "{body}");
    assert!(
        body["redis"]["invalidation"]["subscribed"].is_boolean(),
        "{body}"
    );
    assert_eq!(redis.cli(&["EXISTS", "uma:consumer:{user1-client}"]), "1");
}

#[test]
fn an_unreachable_redis_at_start_is_said_once_without_credentials() {
    let port = common::redis::free_port();
    let url = format!("redis://:sekret-pw@127.0.0.1:{port}");
    let service = Service::bundled_with_env(&[
        ("UMA_REDIS__URL", url.as_str()),
        ("UMA_REDIS__HEALTH_INTERVAL_MS", "20"),
    ]);
    let started = Instant::now();
    while !service.logs().contains("unreachable at start")
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Many more failed checks later, still said once.
    std::thread::sleep(Duration::from_millis(500));
    let logs = service.logs();
    let said: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(&format!("127.0.0.1:{port}")))
        .collect();
    assert_eq!(said.len(), 1, "{logs}");
    assert!(said[0].contains("WARN"), "{}", said[0]);
    assert!(
        said[0].contains(&format!("redis://***@127.0.0.1:{port}")),
        "{}",
        said[0]
    );
    assert!(!logs.contains("sekret-pw"), "{logs}");
    // An outage at start neither stops the service nor makes it unready.
    assert_eq!(allowed(&service), 200);
    let r = service.call("/readyz", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["redis"]["connected"], false);
    assert_eq!(r.json()["redis"]["seed_copies"], "pending");
}

#[test]
fn one_wrong_typed_key_holds_back_only_its_own_consumer() {
    for poison in [
        "counter is a string",
        "field is not a count",
        "index is a string",
        "ledger is a hash",
    ] {
        let redis = Redis::start();
        // A command timeout no CPU starvation reaches: only the poisoned keys may fail here.
        let service = service(
            &redis,
            &[
                ("UMA_TDL__FLUSH_INTERVAL_MS", "50"),
                ("UMA_REDIS__COMMAND_TIMEOUT_MS", "1000"),
            ],
        );
        let (today, tomorrow) = (today(), today().tomorrow().unwrap());
        let mut bad = Vec::new();
        for date in [today, tomorrow] {
            let counter = format!("uma:tdl:{{user1-client}}:kt-midm-base:{date}");
            let index = format!("uma:tdl-entries:{{user1-client}}:{date}");
            match poison {
                "counter is a string" => {
                    redis.cli(&["SET", &counter, "oops"]);
                    bad.push(counter);
                }
                "field is not a count" => {
                    let mut args = vec!["HSET".to_owned(), counter.clone()];
                    for slot in 1..=12 {
                        args.extend([format!("T{slot}"), "x".to_owned()]);
                    }
                    redis.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
                    bad.push(counter);
                }
                "index is a string" => {
                    redis.cli(&["SET", &index, "oops"]);
                    bad.push(index);
                }
                _ => {}
            }
        }
        if poison == "ledger is a hash" {
            let ledger = format!("uma:tdl-applied:{{user1-client}}:{}", instance_of(&service));
            redis.cli(&["HSET", &ledger, "x", "1"]);
            bad.push(ledger);
        }
        for _ in 0..20 {
            assert_eq!(allowed(&service), 200);
            assert_eq!(service.call_auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
        }
        // The healthy consumer's counts arrive, exactly.
        assert!(
            redis.wait_for(Duration::from_secs(3), |r| counted(r, "admin-client") == 20),
            "{poison}: admin {}",
            counted(&redis, "admin-client")
        );
        // The poisoned consumer's wait in memory, and the key is named in an error.
        let started = Instant::now();
        while !service.logs().contains(&bad[0]) && started.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let logs = service.logs();
        let line = logs
            .lines()
            .find(|l| l.contains(&bad[0]))
            .unwrap_or_else(|| panic!("{poison}: {} not logged:\n{logs}", bad[0]));
        assert!(line.contains("ERROR"), "{line}");
        assert_eq!(
            counted(&redis, "user1-client"),
            0,
            "{poison}: nothing half-applied"
        );
        assert!(
            metric(&service, "uma_tdl_rejected_writes_total") >= 1.0,
            "{poison}"
        );
        // Retried every flush, logged once a minute.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            service
                .logs()
                .lines()
                .filter(|l| l.contains(&bad[0]))
                .count(),
            1,
            "{poison}"
        );
        let (complete, _, shown) = tdl(&service, USER1_KEY);
        assert!(!complete, "{poison}: redis could not be read for user1");
        assert_eq!(
            tdl_sum(&shown, "kt-midm-base"),
            20,
            "{poison}: pending counts are shown"
        );
        let (complete, _, shown) = tdl(&service, ADMIN_KEY);
        assert!(complete);
        assert_eq!(tdl_sum(&shown, "azure-gpt4o"), 20);
        // The operator repairs the key: the kept counts arrive, exactly once.
        for key in &bad {
            redis.cli(&["DEL", key]);
        }
        assert!(
            redis.wait_for(Duration::from_secs(3), |r| counted(r, "user1-client") == 20),
            "{poison}: user1 {}",
            counted(&redis, "user1-client")
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(counted(&redis, "user1-client"), 20, "{poison}");
        assert_eq!(counted(&redis, "admin-client"), 20, "{poison}");
        let (complete, _, shown) = tdl(&service, USER1_KEY);
        assert!(complete, "{poison}");
        assert_eq!(tdl_sum(&shown, "kt-midm-base"), 20, "{poison}");
    }
}

#[test]
fn the_old_shared_ledger_key_blocks_nobody() {
    // The review's repro: the ledger key of earlier versions, overwritten with a string.
    let redis = Redis::start();
    redis.cli(&["SET", "uma:tdl-applied:{user1-client}", "oops"]);
    let service = service(&redis, &[("UMA_TDL__FLUSH_INTERVAL_MS", "50")]);
    for _ in 0..10 {
        assert_eq!(allowed(&service), 200);
        assert_eq!(service.call_auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
    }
    assert!(redis.wait_for(Duration::from_secs(3), |r| {
        counted(r, "user1-client") == 10 && counted(r, "admin-client") == 10
    }));
}

#[test]
fn restarts_leave_no_ledger_without_a_ttl() {
    let redis = Redis::start();
    for _ in 0..3 {
        let service = service(&redis, &[("UMA_TDL__FLUSH_INTERVAL_MS", "50")]);
        for _ in 0..5 {
            assert_eq!(allowed(&service), 200);
        }
        let status = service.terminate(Duration::from_secs(8)).expect("exit");
        assert!(status.success());
    }
    assert_eq!(
        counted(&redis, "user1-client"),
        15,
        "exactly once across restarts"
    );
    let ledgers: Vec<String> = redis
        .cli(&["KEYS", "uma:tdl-applied:*"])
        .lines()
        .map(str::to_owned)
        .collect();
    // One small key per process, each expiring on its own: nothing accumulates for good.
    assert_eq!(ledgers.len(), 3, "{ledgers:?}");
    for key in &ledgers {
        assert!(key.starts_with("uma:tdl-applied:{user1-client}:"), "{key}");
        assert_eq!(redis.cli(&["TYPE", key]), "string", "{key}");
        let ttl: i64 = redis.cli(&["TTL", key]).parse().unwrap();
        assert!(ttl > 0 && ttl <= 86_400, "{key}: ttl {ttl}");
    }
}

#[test]
fn tdl_matrix_answers_during_an_outage_and_never_goes_backwards() {
    let mut redis = Redis::start();
    // A command timeout no CPU starvation reaches: Redis is down only when the test says so.
    let service = service(
        &redis,
        &[
            ("UMA_TDL__FLUSH_INTERVAL_MS", "50"),
            ("UMA_REDIS__COMMAND_TIMEOUT_MS", "1000"),
        ],
    );
    let calls = |n: u64| {
        for _ in 0..n {
            assert_eq!(allowed(&service), 200);
        }
    };
    calls(10);
    assert!(redis.wait_for(Duration::from_secs(3), |r| total(r, USER1_COUNTER) == 10));
    let mut last = tdl(&service, USER1_KEY);
    assert!(last.0);
    assert_eq!(tdl_sum(&last.2, "kt-midm-base"), 10);
    let mut step = |expected: u64, complete: bool, what: &str| {
        let now = tdl(&service, USER1_KEY);
        assert_eq!(now.0, complete, "{what}: {now:?}");
        assert_eq!(tdl_sum(&now.2, "kt-midm-base"), expected, "{what}: {now:?}");
        never_less(&last, &now);
        last = now;
    };
    calls(5);
    step(15, true, "counts not all written yet");
    redis.kill();
    wait_connected(&service, false);
    step(
        15,
        false,
        "redis killed: the last read plus what came since",
    );
    calls(7);
    step(22, false, "more calls during the outage");
    redis.launch();
    wait_connected(&service, true);
    assert!(redis.wait_for(Duration::from_secs(5), |r| total(r, USER1_COUNTER) == 22));
    step(22, true, "redis back");
    redis.freeze();
    wait_connected(&service, false);
    step(22, false, "redis hung");
    calls(3);
    step(25, false, "calls while redis hangs");
    redis.thaw();
    wait_connected(&service, true);
    assert!(redis.wait_for(Duration::from_secs(5), |r| total(r, USER1_COUNTER) == 25));
    step(25, true, "redis answers again");
}

#[test]
fn polling_while_two_instances_flush_never_shows_a_count_go_backwards() {
    let redis = Redis::start();
    let fast = [
        ("UMA_TDL__FLUSH_INTERVAL_MS", "20"),
        ("UMA_CACHE__LOCAL_TTL_MS", "100"),
    ];
    let a = service(&redis, &fast);
    let b = service(&redis, &[fast[0], fast[1], ("UMA_TDL__MODE", "sync")]);
    let (stream_a, stream_b) = (Stream::start(a.addr), Stream::start(b.addr));
    stream_a.wait_calls(20);
    let started = Instant::now();
    let (mut frozen, mut thawed) = (false, false);
    let mut seen = (0, 0);
    let mut last = tdl(&a, USER1_KEY);
    while started.elapsed() < Duration::from_secs(3) {
        if !frozen && started.elapsed() > Duration::from_millis(1000) {
            redis.freeze();
            frozen = true;
        }
        if frozen && !thawed && started.elapsed() > Duration::from_millis(1800) {
            redis.thaw();
            thawed = true;
        }
        let now = tdl(&a, USER1_KEY);
        never_less(&last, &now);
        if now.0 {
            seen.0 += 1;
        } else {
            seen.1 += 1;
        }
        last = now;
    }
    let (calls_a, failures_a, _) = stream_a.finish();
    let (calls_b, failures_b, _) = stream_b.finish();
    assert!(failures_a.is_empty() && failures_b.is_empty());
    assert!(
        seen.0 > 0 && seen.1 > 0,
        "complete and incomplete answers: {seen:?}"
    );
    let calls = calls_a + calls_b;
    assert!(
        redis.wait_for(Duration::from_secs(5), |r| total(r, USER1_COUNTER) == calls),
        "{} of {calls}",
        total(&redis, USER1_COUNTER)
    );
    // Once Redis answers in time again (a slow moment may have marked it down), the answer is complete.
    let started = Instant::now();
    let mut end = tdl(&a, USER1_KEY);
    while !end.0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        end = tdl(&a, USER1_KEY);
    }
    assert!(end.0, "{end:?}");
    never_less(&last, &end);
    assert_eq!(tdl_sum(&end.2, "kt-midm-base"), calls);
}
