//! Request limits (SPEC §8.1) through the real binary: 429 with `Retry-After` and the RateLimit
//! fields at exactly the limit, in embedded mode and leased from a real Redis by one and by three
//! replica processes under concurrency, and the three `on_redis_down` modes during an outage.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

const TDL: &str = "{T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}";

/// One consumer `limited` (key `lk`) whose only entry `e` has `limits`.
fn seed(limits: &str) -> String {
    format!(
        "consumers:
  - username: limited
    keyauth_credentials: [{{key: lk}}]
    plugins:
      - name: user-metadata
        config:
          metadata_list:
            - {{id: e, provider_name: p, tdl_matrix: {TDL}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: 0, output_cost_per_token: 0, limits: {limits}}}
  - username: free
    keyauth_credentials: [{{key: fk}}]
    plugins:
      - name: user-metadata
        config:
          metadata_list:
            - {{id: e, provider_name: p, tdl_matrix: {TDL}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: 0, output_cost_per_token: 0}}
"
    )
}

fn call(service: &Service, key: &str) -> Response {
    service.get("/auth", &[("apikey", key), ("X-Forwarded-Uri", "/chat")])
}

/// A structured-field list member: `"name";k=v;k=v`.
fn members(field: &str) -> Vec<(String, Vec<(String, u64)>)> {
    field
        .split(", ")
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
                    assert!(k.bytes().all(|b| b.is_ascii_lowercase()), "{field}");
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

fn param(members: &[(String, Vec<(String, u64)>)], name: &str, key: &str) -> u64 {
    let (_, params) = members
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"));
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap()
}

#[test]
fn each_window_refuses_at_exactly_its_limit_with_the_fields() {
    away_from_midnight();
    let service = Service::with_files(
        "",
        &seed("{requests_per_minute: 1000, requests_per_day: 3}"),
    );
    for i in 0..3u64 {
        let r = call(&service, "lk");
        assert_eq!(r.status, 200, "call {i}: {r:?}");
        let policy = members(r.header("ratelimit-policy").unwrap());
        assert_eq!(param(&policy, "day", "q"), 3);
        assert_eq!(param(&policy, "day", "w"), 86_400);
        assert_eq!(param(&policy, "minute", "q"), 1000);
        assert_eq!(param(&policy, "minute", "w"), 60);
        let state = members(r.header("ratelimit").unwrap());
        assert_eq!(param(&state, "day", "r"), 2 - i);
        let t = param(&state, "day", "t");
        assert!(t.abs_diff(secs_to_utc_midnight()) <= 1, "t={t}");
        assert!(param(&state, "minute", "t") <= 60);
    }
    let r = call(&service, "lk");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["message"], "API rate limit exceeded");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry.abs_diff(secs_to_utc_midnight()) <= 1,
        "Retry-After {retry}"
    );
    assert_eq!(
        param(&members(r.header("ratelimit").unwrap()), "day", "r"),
        0
    );
    assert!(r.header("ratelimit-policy").is_some());
    for name in METADATA_HEADERS {
        assert_eq!(r.header(name), None, "{name} on a 429");
    }
    // An entry without limits sends neither field; /api/* is never limited or counted.
    let free = call(&service, "fk");
    assert_eq!(free.status, 200);
    assert_eq!(free.header("ratelimit"), None);
    assert_eq!(free.header("ratelimit-policy"), None);
    assert_eq!(
        service
            .get("/api/user-metadata", &[("apikey", "lk")])
            .status,
        200
    );
    // Refused calls count nowhere: the TDL counters show exactly the limit.
    let tdl = service.get("/api/tdl-matrix", &[("apikey", "lk")]).json();
    let used: u64 = tdl["entries"][0]["usage"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(used, 3, "{tdl}");
    let metrics = service.get("/metrics", &[]).body;
    assert!(
        metrics.contains(r#"uma_requests_total{endpoint="auth",decision="rate_limited"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_zero_limit_refuses_the_first_call() {
    let service = Service::with_files("", &seed("{requests_per_slot: 0}"));
    let r = call(&service, "lk");
    assert_eq!(r.status, 429, "{r:?}");
    let policy = members(r.header("ratelimit-policy").unwrap());
    assert_eq!(param(&policy, "slot", "q"), 0);
    assert!((3_600..=10_800).contains(&param(&policy, "slot", "w")));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10_800).contains(&retry));
}

fn redis_service(redis: &Redis, limits: &str, extra: &[(&str, &str)]) -> Service {
    let url = redis.url();
    let mut env = vec![
        ("UMA_REDIS__URL", url.as_str()),
        ("UMA_REDIS__COMMAND_TIMEOUT_MS", "1000"),
    ];
    env.extend_from_slice(extra);
    let service = Service::with_files_env("", &seed(limits), &env);
    let started = Instant::now();
    while service.get("/readyz", &[]).status != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    service
}

/// Calls from `clients` threads, round robin over `services`, until every one of them has refused
/// `rounds` times in a row; returns how many calls were allowed.
fn flood(services: &[Service], clients: usize, max_calls: u64) -> u64 {
    let allowed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        for client in 0..clients {
            let (allowed, sent) = (allowed.clone(), sent.clone());
            scope.spawn(move || {
                let mut refusals_in_a_row = vec![0u32; services.len()];
                let mut i = client;
                while sent.fetch_add(1, Ordering::Relaxed) < max_calls {
                    let which = i % services.len();
                    i += 1;
                    match call(&services[which], "lk").status {
                        200 => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                            refusals_in_a_row[which] = 0;
                        }
                        429 => refusals_in_a_row[which] += 1,
                        other => panic!("status {other}"),
                    }
                    if refusals_in_a_row.iter().all(|n| *n >= 3) {
                        break;
                    }
                }
            });
        }
    });
    allowed.load(Ordering::Relaxed)
}

#[test]
fn one_replica_with_redis_allows_exactly_the_limit_to_32_clients() {
    away_from_midnight();
    let redis = Redis::start();
    let service = redis_service(&redis, "{requests_per_day: 200}", &[]);
    let allowed = flood(std::slice::from_ref(&service), 32, 600);
    assert_eq!(allowed, 200);
    // Leased quota lives in keys of its own, under the consumer's hash tag, expiring.
    let keys = redis.cli(&["KEYS", "uma:quota:{limited}:e:d:*"]);
    let key = keys
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no quota key"));
    assert_eq!(redis.cli(&["HGET", key, "total"]), "200");
    let ttl: i64 = redis.cli(&["TTL", key]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 86_400 + 60, "TTL {ttl}");
}

#[test]
fn three_replicas_together_allow_exactly_the_limit() {
    away_from_midnight();
    let redis = Redis::start();
    let services: Vec<Service> = (0..3)
        .map(|_| redis_service(&redis, "{requests_per_day: 500}", &[]))
        .collect();
    let allowed = flood(&services, 12, 3_000);
    assert_eq!(allowed, 500);
    // Each replica's holdings add up to the total, and the total is the limit.
    let key = redis.cli(&["KEYS", "uma:quota:{limited}:e:d:*"]);
    let fields = redis.cli(&["HGETALL", key.trim()]);
    let values: Vec<&str> = fields.lines().collect();
    let mut total = 0;
    let mut held = 0;
    for pair in values.chunks(2) {
        let n: u64 = pair[1].parse().unwrap();
        if pair[0] == "total" {
            total = n;
        } else {
            held += n;
        }
    }
    assert_eq!((total, held), (500, 500), "{fields}");
    // Counted exactly once in the TDL counters too (they flush within a second).
    std::thread::sleep(Duration::from_millis(1_500));
    let counted = redis.cli(&["KEYS", "uma:tdl:{limited}:e:*"]);
    let sum: u64 = counted.lines().map(|k| redis.counter_total(k)).sum();
    assert_eq!(sum, 500);
}

#[test]
fn an_idle_replica_gives_its_unused_lease_back() {
    away_from_midnight();
    let redis = Redis::start();
    let a = redis_service(&redis, "{requests_per_day: 160}", &[]);
    let b = redis_service(&redis, "{requests_per_day: 160}", &[]);
    // A leases a slice (a sixteenth, 10) on its first call, then goes idle.
    assert_eq!(call(&a, "lk").status, 200);
    std::thread::sleep(Duration::from_millis(1_800));
    // B can now use everything but A's one call.
    let mut allowed = 0;
    while call(&b, "lk").status == 200 {
        allowed += 1;
        assert!(allowed <= 200, "never refused");
    }
    assert_eq!(allowed, 159);
}

#[test]
fn on_redis_down_local_keeps_enforcing_with_what_it_knew() {
    away_from_midnight();
    let mut redis = Redis::start();
    let service = redis_service(&redis, "{requests_per_day: 40}", &[]);
    for _ in 0..10 {
        assert_eq!(call(&service, "lk").status, 200);
    }
    redis.kill();
    wait_disconnected(&service);
    // 30 remain by what it knew: exactly those are allowed while Redis is down.
    let mut allowed = 0;
    for _ in 0..60 {
        if call(&service, "lk").status == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 30);
    // Back up: the calls made meanwhile are recorded, so the window stays exhausted.
    redis.restart();
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(call(&service, "lk").status, 429);
    // Every allowed call, before and during the outage, is counted exactly once.
    assert!(redis.wait_for(Duration::from_secs(5), |r| {
        let keys = r.cli(&["KEYS", "uma:tdl:{limited}:e:*"]);
        keys.lines().map(|k| r.counter_total(k)).sum::<u64>() == 40
    }));
}

#[test]
fn on_redis_down_deny_answers_503_and_allow_lets_calls_through() {
    let mut redis = Redis::start();
    let deny = redis_service(
        &redis,
        "{requests_per_day: 5}",
        &[("UMA_LIMITS__ON_REDIS_DOWN", "deny")],
    );
    let allow = redis_service(
        &redis,
        "{requests_per_day: 5}",
        &[("UMA_LIMITS__ON_REDIS_DOWN", "allow")],
    );
    assert_eq!(call(&deny, "lk").status, 200);
    redis.kill();
    wait_disconnected(&deny);
    wait_disconnected(&allow);
    let r = call(&deny, "lk");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    // An entry without limits is not affected.
    assert_eq!(call(&deny, "fk").status, 200);
    let allowed = (0..20).filter(|_| call(&allow, "lk").status == 200).count();
    assert_eq!(allowed, 20);
}

fn wait_disconnected(service: &Service) {
    let started = Instant::now();
    while service.get("/readyz", &[]).json()["redis"]["connected"] != false {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never saw the outage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn leases_cost_at_most_a_fiftieth_of_a_round_trip_per_call() {
    away_from_midnight();
    let redis = Redis::start();
    let service = redis_service(&redis, "{requests_per_day: 1000}", &[]);
    // 900 calls: more than 10% of the limit remains throughout (SPEC §8.1 accuracy bullet 3).
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..225 {
                    assert_eq!(call(&service, "lk").status, 200);
                }
            });
        }
    });
    let metrics = service.get("/metrics", &[]).body;
    let trips: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("uma_quota_round_trips_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(trips <= 18.0, "{trips} round trips for 900 calls");
    assert!(trips >= 1.0);
}
