//! Operator records in a real Redis are held to the seed's rules by the same constructor: the
//! header budget (review D8: a record with 300 groups once produced a 6.4 KB answer head, past
//! nginx's 4 KiB buffer) and the character rules.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

fn service(redis: &Redis) -> Service {
    let url = redis.url();
    let service = Service::bundled_with_env(&[
        ("UMA_REDIS__URL", url.as_str()),
        ("UMA_CACHE__LOCAL_TTL_MS", "50"),
        ("UMA_CACHE__NEGATIVE_TTL_MS", "50"),
    ]);
    let started = Instant::now();
    while service.get("/readyz", &[]).json()["redis"]["connected"] != true {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    service
}

fn hash(key: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args(["hash-key", key])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn an_operator_record_over_the_header_budget_is_never_answered() {
    let redis = Redis::start();
    let service = service(&redis);
    let groups: Vec<String> = (0..300).map(|i| format!("\"group-number-{i}\"")).collect();
    let record = format!(
        "{{\"username\":\"op-wide\",\"groups\":[{}],\"metadata_list\":null}}",
        groups.join(",")
    );
    redis.cli(&["SET", "uma:consumer:{op-wide}", &record]);
    redis.cli(&[
        "SET",
        &format!("uma:key:{}", hash("op-wide-key")),
        "op-wide",
    ]);
    let r = service.get(
        "/auth",
        &[
            ("apikey", "op-wide-key"),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    // Not a consumer the service can answer for: refused as unknown, never a 6 KB head.
    assert_eq!(r.status, 401, "{r:?}");
    let head: usize = r.headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    assert!(head < 1024, "answer head of {head} bytes");
    let metrics = service.get("/metrics", &[]).body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "uma_redis_corrupt_records_total 1"),
        "{metrics}"
    );

    // The same record within the budget is a consumer (with no metadata list it gets 403, not 401).
    let record = "{\"username\":\"op-wide\",\"groups\":[\"a\",\"b\"],\"metadata_list\":null}";
    redis.cli(&["SET", "uma:consumer:{op-wide}", record]);
    std::thread::sleep(Duration::from_millis(100));
    let r = service.get(
        "/auth",
        &[
            ("apikey", "op-wide-key"),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    assert_eq!(r.status, 403, "{r:?}");
}
