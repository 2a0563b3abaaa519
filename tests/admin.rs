//! The admin API (SPEC §10) against the real binary and real `redis-server` processes: the token
//! and its throttle, consumers (list, get, put, delete with tombstones), keys (create, rotate,
//! patch, revoke), the audit trail, embedded mode, Redis down (nothing half-written), and
//! invalidation across three replicas within 1 s, also when a subscription is killed.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::admin::*;
use common::redis::Redis;
use common::*;
use serde_json::{Value, json};

const ALICE_KEY: &str = "alice-seed-key-0001";
const BOB_KEY: &str = "bob-seed-key-0001";
const CAROL_KEY: &str = "carol-seed-key-0001";
const TDL_YAML: &str = "{T1: [1, 2], T2: [1, 2], T3: [1, 2], T4: [1, 2], T5: [1, 2], T6: [1, 2], T7: [1, 2], T8: [1, 2], T9: [1, 2], T10: [1, 2], T11: [1, 2], T12: [1, 2]}";
/// SPEC §10: every replica serves an admin write's new state within this.
const BOUND: Duration = Duration::from_secs(1);

/// Three seed consumers, no routes: each consumer's own list applies on any URI.
fn seed() -> String {
    let mut out = String::from("consumers:\n");
    for (name, key, custom_id, group) in [
        ("alice", ALICE_KEY, "alice-001", "g-a"),
        ("bob", BOB_KEY, "bob-001", "g-b"),
        ("carol", CAROL_KEY, "carol-001", "g-c"),
    ] {
        out.push_str(&format!(
            "  - username: {name}\n    custom_id: {custom_id}\n    tags: [team-{name}]\n    keyauth_credentials: [{{key: {key}}}]\n    acls: [{{group: {group}}}]\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n            - {{id: e-{name}, provider_name: p-{name}, tags: [t-{name}], tdl_matrix: {TDL_YAML}, capabilities: [1, 0], max_input_tokens: 10, max_output_tokens: 5, input_cost_per_token: 0.001, output_cost_per_token: 0.002}}\n"
        ));
    }
    out
}

fn node(redis: &Redis) -> Node {
    Node::start(Some(redis), &seed())
}

/// `value` with every number as a float, so `1` and `1.0` compare equal (the contract does not pin
/// how a stored number is printed back).
fn numbers_as_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64().expect("finite")),
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), numbers_as_floats(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn assert_same_numbers(got: &Value, expected: &Value, context: &str) {
    assert_eq!(
        numbers_as_floats(got),
        numbers_as_floats(expected),
        "{context}: {got}"
    );
}

fn usernames(list: &Value) -> Vec<String> {
    list["consumers"]
        .as_array()
        .unwrap_or_else(|| panic!("no consumers: {list}"))
        .iter()
        .map(|c| c["username"].as_str().expect("username").to_owned())
        .collect()
}

fn key_ids(consumer: &Value) -> Vec<String> {
    consumer["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys: {consumer}"))
        .iter()
        .map(|k| k["id"].as_str().expect("key id").to_owned())
        .collect()
}

fn problem_fields(r: &Response) -> BTreeSet<String> {
    let body = r.json();
    let problems = body["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems: {r:?}"));
    for p in problems {
        assert!(
            p["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "a problem without a reason: {p}"
        );
    }
    problems
        .iter()
        .map(|p| p["field"].as_str().expect("field").to_owned())
        .collect()
}

/// Asserts a 422 naming (at least) `field`.
fn assert_invalid_field(r: &Response, field: &str, context: &str) {
    assert_eq!(r.status, 422, "{context}: {r:?}");
    let fields = problem_fields(r);
    assert!(
        fields.contains(field),
        "{context}: {fields:?} lacks {field}"
    );
}

fn assert_not_found(r: &Response, message: &str, context: &str) {
    assert_eq!(r.status, 404, "{context}: {r:?}");
    assert_eq!(r.json(), json!({ "message": message }), "{context}");
}

/// Polls `node` until `key` is refused like an unknown key, within `limit`.
fn refused_within(node: &Node, key: &str, limit: Duration) -> bool {
    poll(limit, || node.auth_key(key).status == 401).is_some() && {
        assert_refused(&node.auth_key(key), "refused key");
        true
    }
}

/// `/auth`'s status for `key`, asked again while it is 503: under the full suite's load a Redis
/// with `appendfsync always` can stall past the command timeout, and a key only Redis knows then
/// answers 503 (SPEC §4: cannot decide) until the next health check. What is tested is the
/// decision, not that stall.
fn decided(node: &Node, key: &str) -> u16 {
    let started = Instant::now();
    loop {
        let status = node.auth_key(key).status;
        if status != 503 || started.elapsed() > Duration::from_secs(3) {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn allowed_within(node: &Node, key: &str, limit: Duration) -> bool {
    poll(limit, || node.auth_key(key).status == 200).is_some()
}

/// Polls every node (round robin, ~5 ms) until `ok` holds on each or `limit` passes since the
/// call: the time each took.
fn on_all(nodes: &[&Node], limit: Duration, ok: impl Fn(&Node) -> bool) -> Vec<Option<Duration>> {
    let started = Instant::now();
    let mut took: Vec<Option<Duration>> = vec![None; nodes.len()];
    loop {
        for (i, node) in nodes.iter().enumerate() {
            if took[i].is_none() && ok(node) {
                took[i] = Some(started.elapsed());
            }
        }
        if took.iter().all(Option::is_some) || started.elapsed() >= limit {
            return took;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn assert_all(took: &[Option<Duration>], what: &str) {
    println!("{what}: {took:?}");
    assert!(
        took.iter().all(Option::is_some),
        "{what}: not on every replica in time: {took:?}"
    );
}

fn warm(nodes: &[&Node], key: &str) {
    for node in nodes {
        for _ in 0..3 {
            assert_eq!(decided(node, key), 200, "warming {key}");
        }
    }
}

fn all(replicas: &Replicas) -> Vec<&Node> {
    replicas.nodes.iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Tokens

#[test]
fn without_a_token_the_admin_listener_is_closed_and_a_short_token_is_a_config_error() {
    let options = NodeOptions {
        token: Some(String::new()),
        ..NodeOptions::default()
    };
    let node = Node::start_with(None, &seed(), &options);
    let refused =
        TcpStream::connect(node.admin).expect_err("admin listener opened without a token");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(decided(&node, ALICE_KEY), 200, "the service serves");

    let dir = tempfile::tempdir().unwrap();
    let seed_path = write_file(dir.path(), "seed.yaml", &seed());
    let config = write_file(dir.path(), "config.toml", "");
    let check = |token: &str| {
        Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&config)
            .arg("--seed")
            .arg(&seed_path)
            .env("UMA_ADMIN__TOKEN", token)
            .env_remove("UMA_ADMIN__TOKEN_FILE")
            .output()
            .expect("run check")
    };
    let short = check(&"x".repeat(31));
    assert_eq!(short.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&short.stdout),
        String::from_utf8_lossy(&short.stderr)
    );
    assert!(
        text.contains("admin.token: a token must have at least 32 characters"),
        "{text}"
    );
    assert!(
        !text.contains(&"x".repeat(31)),
        "check printed the token: {text}"
    );
    let enough = check(&"x".repeat(32));
    assert!(
        enough.status.success(),
        "{}",
        String::from_utf8_lossy(&enough.stderr)
    );
}

const ROUTES: [(&str, &str); 11] = [
    ("GET", "/admin/consumers"),
    ("GET", "/admin/consumers/alice"),
    ("PUT", "/admin/consumers/alice"),
    ("DELETE", "/admin/consumers/alice"),
    ("POST", "/admin/consumers/alice/keys"),
    ("POST", "/admin/consumers/alice/keys/some-id/rotate"),
    ("PATCH", "/admin/consumers/alice/keys/some-id"),
    ("DELETE", "/admin/consumers/alice/keys/some-id"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/usage?month=2026-01"),
    ("GET", "/admin/audit"),
];

#[test]
fn every_admin_route_refuses_a_missing_or_wrong_token_and_never_logs_it() {
    let redis = Redis::start();
    let node = node(&redis);
    let token_lines = |logs: &str| {
        logs.lines()
            .filter(|l| l.to_ascii_lowercase().contains("token"))
            .count()
    };
    let before = token_lines(&node.logs());
    let wrong = "wrong-admin-token-0123456789abcdef-xyz";
    let body = br#"{"custom_id":"hacked"}"#;
    for (i, (method, path)) in ROUTES.iter().enumerate() {
        // Each route from an address of its own: four failures stay below the throttle.
        let source = Ipv4Addr::new(127, 0, 0, 10 + i as u8);
        let with_token = format!("Bearer {TOKEN}x");
        let basic = format!("Basic {TOKEN}");
        let bearer_wrong = format!("Bearer {wrong}");
        for authorization in [
            None,
            Some(bearer_wrong.as_str()),
            Some(&basic),
            Some(&with_token),
        ] {
            let r = admin_request(
                node.admin,
                Some(source),
                method,
                path,
                authorization,
                Some(body),
            );
            assert_eq!(r.status, 401, "{method} {path} {authorization:?}: {r:?}");
            assert_eq!(r.json(), json!({"message": "Invalid admin token"}));
        }
        // The right token from that address is not throttled by four failures.
        let ok = admin_request(
            node.admin,
            Some(source),
            "GET",
            "/admin/consumers",
            Some(&format!("Bearer {TOKEN}")),
            None,
        );
        assert_eq!(ok.status, 200, "{ok:?}");
    }
    // Nothing was applied: alice is as the seed has her.
    let alice = node.expect(200, "GET", "/admin/consumers/alice", None);
    assert_eq!(alice["custom_id"], "alice-001");
    assert_eq!(alice["source"], "seed");
    assert_eq!(decided(&node, ALICE_KEY), 200);
    let logs = node.logs();
    assert!(
        token_lines(&logs) > before,
        "refused attempts are not logged:\n{logs}"
    );
    assert!(!logs.contains(TOKEN), "a token in the logs:\n{logs}");
    assert!(
        !logs.contains(wrong),
        "a presented token in the logs:\n{logs}"
    );
    // POST /admin/reload with the token (another test covers reloads in depth).
    let reload = node.expect(200, "POST", "/admin/reload", None);
    assert_eq!(reload["result"], "ok", "{reload}");
}

#[test]
fn failed_token_checks_are_throttled_per_client_address_for_a_second() {
    let node = Node::start(None, &seed());
    let source = Ipv4Addr::new(127, 0, 0, 2);
    let right = format!("Bearer {TOKEN}");
    let call = |source: Ipv4Addr, authorization: &str| {
        admin_request(
            node.admin,
            Some(source),
            "GET",
            "/admin/consumers",
            Some(authorization),
            None,
        )
    };
    let mut observed = false;
    for _ in 0..3 {
        let first = Instant::now();
        for i in 0..10 {
            let r = call(source, "Bearer not-the-token-0123456789abcdef0123");
            assert_eq!(r.status, 401, "failure {i}: {r:?}");
        }
        let throttled = call(source, &right);
        let other = call(Ipv4Addr::new(127, 0, 0, 3), &right);
        if first.elapsed() < Duration::from_millis(900) {
            assert_eq!(throttled.status, 429, "{throttled:?}");
            assert_eq!(
                throttled.json(),
                json!({"message": "Too many failed admin token checks"})
            );
            assert_eq!(
                other.status, 200,
                "another address is not throttled: {other:?}"
            );
            observed = true;
            break;
        }
        // Too slow a machine to make ten failures within the second: again.
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(observed, "never managed ten failures within a second");
    std::thread::sleep(Duration::from_millis(1200));
    let again = call(source, &right);
    assert_eq!(
        again.status, 200,
        "a second later the token works: {again:?}"
    );
    assert_eq!(usernames(&again.json()), ["alice", "bob", "carol"]);
}

// ---------------------------------------------------------------------------------------------
// Consumers

#[test]
fn consumers_are_listed_sorted_paged_and_filtered() {
    let redis = Redis::start();
    let node = node(&redis);
    for name in ["zed", "al-op", "dave"] {
        let r = node.call(
            "PUT",
            &format!("/admin/consumers/{name}"),
            Some(&consumer_body("c", "p", &["g"])),
        );
        assert_eq!(r.status, 201, "{r:?}");
    }
    let all = node.call("GET", "/admin/consumers", None);
    assert_eq!(all.status, 200, "{all:?}");
    assert!(
        all.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{all:?}"
    );
    let list = all.json();
    assert_eq!(
        usernames(&list),
        ["al-op", "alice", "bob", "carol", "dave", "zed"]
    );
    assert_eq!(list["next_cursor"], Value::Null, "{list}");
    for c in list["consumers"].as_array().unwrap() {
        let expected = if ["alice", "bob", "carol"].contains(&c["username"].as_str().unwrap()) {
            "seed"
        } else {
            "operator"
        };
        assert_eq!(c["source"], expected, "{c}");
    }

    // Pages of two, each cursor the last username of its page, together the whole list.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/consumers?limit=2&cursor={c}"),
            None => "/admin/consumers?limit=2".to_owned(),
        };
        let page = node.expect(200, "GET", &path, None);
        let names = usernames(&page);
        assert!(names.len() <= 2, "{page}");
        pages += 1;
        seen.extend(names.clone());
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(Some(next), names.last().map(String::as_str), "{page}");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert!(pages >= 3, "{pages} pages of two for six consumers");
    assert_eq!(seen, ["al-op", "alice", "bob", "carol", "dave", "zed"]);

    let page = node.expect(200, "GET", "/admin/consumers?prefix=al&limit=1", None);
    assert_eq!(usernames(&page), ["al-op"]);
    assert_eq!(page["next_cursor"], "al-op");
    let page = node.expect(
        200,
        "GET",
        "/admin/consumers?prefix=al&limit=1&cursor=al-op",
        None,
    );
    assert_eq!(usernames(&page), ["alice"]);
    let page = node.expect(200, "GET", "/admin/consumers?prefix=al", None);
    assert_eq!(usernames(&page), ["al-op", "alice"]);
    assert_eq!(page["next_cursor"], Value::Null);
    for limit in ["0", "1001", "-1", "ten"] {
        let r = node.call("GET", &format!("/admin/consumers?limit={limit}"), None);
        assert_eq!(r.status, 400, "limit={limit}: {r:?}");
        assert!(!message(&r).is_empty());
    }
    let page = node.expect(200, "GET", "/admin/consumers?limit=1000", None);
    assert_eq!(usernames(&page).len(), 6);

    // Deleted consumers (an operator one, a seed one) are not listed.
    node.expect(200, "DELETE", "/admin/consumers/dave", None);
    node.expect(200, "DELETE", "/admin/consumers/bob", None);
    let list = node.expect(200, "GET", "/admin/consumers", None);
    assert_eq!(usernames(&list), ["al-op", "alice", "carol", "zed"]);
}

#[test]
fn a_seed_consumer_is_shown_with_its_seed_keys_and_never_a_secret() {
    let redis = Redis::start();
    let node = node(&redis);
    let r = node.call("GET", "/admin/consumers/alice", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!r.body.contains(ALICE_KEY), "the key is shown: {}", r.body);
    assert!(
        !r.body.contains(&sha256_hex(ALICE_KEY)),
        "the key's hash is shown: {}",
        r.body
    );
    let alice = r.json();
    assert_eq!(alice["username"], "alice");
    assert_eq!(alice["custom_id"], "alice-001");
    assert_eq!(alice["tags"], json!(["team-alice"]));
    assert_eq!(alice["acls"], json!([{"group": "g-a"}]));
    assert_eq!(alice["source"], "seed");
    let entry = &alice["metadata_list"][0];
    assert_eq!(entry["id"], "e-alice", "{alice}");
    assert_eq!(entry["provider_name"], "p-alice");
    assert_eq!(entry["tags"], json!(["t-alice"]));
    assert_same_numbers(&entry["capabilities"], &json!([1, 0]), "capabilities");
    assert_same_numbers(&entry["tdl_matrix"], &tdl(), "tdl_matrix");
    assert_same_numbers(&entry["max_input_tokens"], &json!(10), "max_input_tokens");
    assert_same_numbers(&entry["max_output_tokens"], &json!(5), "max_output_tokens");
    assert_same_numbers(&entry["input_cost_per_token"], &json!(0.001), "input cost");
    assert_eq!(alice["metadata_list"].as_array().unwrap().len(), 1);
    let keys = alice["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "{alice}");
    assert_eq!(keys[0]["id"], seed_key_id(ALICE_KEY));
    assert_eq!(keys[0]["name"], Value::Null);
    assert_eq!(keys[0]["source"], "seed");
    assert_eq!(keys[0]["disabled"], false);
    assert_eq!(keys[0]["expires_at"], Value::Null);
    assert!(keys[0].get("key").is_none(), "{alice}");

    assert_not_found(
        &node.call("GET", "/admin/consumers/nobody", None),
        "No such consumer",
        "GET nobody",
    );
}

#[test]
fn put_creates_then_replaces_and_the_consumers_keys_answer_with_the_new_metadata() {
    let redis = Redis::start();
    let node = node(&redis);
    let body = consumer_body("c-1", "p-one", &["g1", "g2"]);
    let r = node.call("PUT", "/admin/consumers/opc", Some(&body));
    assert_eq!(r.status, 201, "{r:?}");
    let created = r.json();
    assert_eq!(created["username"], "opc");
    assert_eq!(created["source"], "operator");
    assert_eq!(created["custom_id"], "c-1");
    assert_eq!(created["tags"], json!(["t-op"]));
    assert_eq!(created["acls"], json!([{"group": "g1"}, {"group": "g2"}]));
    assert_eq!(created["metadata_list"][0]["id"], "e-op");
    assert_eq!(created["metadata_list"][0]["provider_name"], "p-one");
    assert_same_numbers(
        &created["metadata_list"][0]["tdl_matrix"],
        &tdl(),
        "tdl_matrix",
    );
    assert_eq!(created["keys"], json!([]));
    let got = node.expect(200, "GET", "/admin/consumers/opc", None);
    assert_eq!(got, created, "GET differs from PUT's answer");
    assert_eq!(pttl(&redis, "uma:consumer:{opc}"), -1, "an operator record");

    let (id, key) = node.create_key("opc", Some(&json!({"name": "main"})));
    let r = node.auth_key(&key);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("X-Consumer-Username"), Some("opc"));
    assert_eq!(r.header("X-Consumer-Custom-ID"), Some("c-1"));
    assert_eq!(r.header("X-Consumer-Groups"), Some("g1, g2"));
    assert_eq!(r.header("X-Consumer-ID"), Some("e-op"));
    assert_eq!(r.header("X-User-Provider"), Some("p-one"));

    // Replaced (username in the body, equal to the path): 200, the key follows.
    let mut body = consumer_body("c-2", "p-two", &["g3"]);
    body["username"] = json!("opc");
    let r = node.call("PUT", "/admin/consumers/opc", Some(&body));
    assert_eq!(r.status, 200, "{r:?}");
    let replaced = r.json();
    assert_eq!(replaced["source"], "operator");
    assert_eq!(replaced["custom_id"], "c-2");
    assert_eq!(key_ids(&replaced), [id.as_str()], "keys survive a PUT");
    let followed = poll(BOUND, || {
        let r = node.auth_key(&key);
        r.header("X-User-Provider") == Some("p-two")
            && r.header("X-Consumer-Groups") == Some("g3")
            && r.header("X-Consumer-Custom-ID") == Some("c-2")
    });
    assert!(followed.is_some(), "{:?}", node.auth_key(&key));

    // A username in the body that is not the path's.
    let mut other = consumer_body("c-3", "p-three", &[]);
    other["username"] = json!("someone-else");
    assert_invalid_field(
        &node.call("PUT", "/admin/consumers/opc", Some(&other)),
        "username",
        "username differs from the path",
    );
    let still = node.expect(200, "GET", "/admin/consumers/opc", None);
    assert_eq!(still["custom_id"], "c-2");

    // Everything is optional: a bare consumer has no list.
    let r = node.call("PUT", "/admin/consumers/bare", Some(&json!({})));
    assert_eq!(r.status, 201, "{r:?}");
    let bare = node.expect(200, "GET", "/admin/consumers/bare", None);
    assert_eq!(bare["metadata_list"], Value::Null, "{bare}");
    assert_eq!(bare["source"], "operator");

    // A seed consumer taken over: its seed key answers with the operator's metadata.
    node.put_consumer("alice", &consumer_body("alice-op", "p-alice-op", &["g-x"]));
    let alice = node.expect(200, "GET", "/admin/consumers/alice", None);
    assert_eq!(alice["source"], "operator");
    assert_eq!(alice["custom_id"], "alice-op");
    let followed = poll(BOUND, || {
        node.auth_key(ALICE_KEY).header("X-User-Provider") == Some("p-alice-op")
    });
    assert!(followed.is_some(), "{:?}", node.auth_key(ALICE_KEY));
    assert_eq!(
        node.auth_key(ALICE_KEY).header("X-Consumer-Groups"),
        Some("g-x")
    );
}

#[test]
fn invalid_bodies_are_refused_with_every_problem_and_nothing_is_written() {
    let redis = Redis::start();
    let node = node(&redis);
    let mut no_t12 = entry("e1", "p");
    no_t12["tdl_matrix"].as_object_mut().unwrap().remove("T12");
    let mut bad_capability = entry("e2", "p");
    bad_capability["capabilities"] = json!([1, 0, 2]);
    let mut two_problems = entry("e3", "p");
    two_problems["bogus"] = json!(1);
    two_problems["max_input_tokens"] = json!(-1);
    let body = json!({
        "custom_id": "bad\nvalue",
        "acls": [{"group": "a,b"}],
        "metadata_list": [no_t12, bad_capability, two_problems]
    });
    let r = node.call("PUT", "/admin/consumers/badc", Some(&body));
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.json()["message"], "Invalid consumer");
    let expected: BTreeSet<String> = [
        "custom_id",
        "acls[0].group",
        "metadata_list[0].tdl_matrix",
        "metadata_list[1].capabilities[2]",
        "metadata_list[2].bogus",
        "metadata_list[2].max_input_tokens",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(problem_fields(&r), expected, "{r:?}");

    assert_invalid_field(
        &node.call("PUT", "/admin/consumers/badc", Some(&json!({"tags": "x"}))),
        "tags",
        "a wrong type",
    );
    assert_invalid_field(
        &node.call("PUT", "/admin/consumers/a%7Bb%7D", Some(&json!({}))),
        "username",
        "a brace in the username",
    );
    let malformed = node.call_raw("PUT", "/admin/consumers/badc", br#"{"custom_id":"#);
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert!(!message(&malformed).is_empty());

    assert_not_found(
        &node.call("GET", "/admin/consumers/badc", None),
        "No such consumer",
        "nothing created",
    );
    assert_eq!(redis.cli(&["EXISTS", "uma:consumer:{badc}"]), "0");
    assert!(
        !usernames(&node.expect(200, "GET", "/admin/consumers", None)).contains(&"badc".to_owned())
    );
}

#[test]
fn deleting_consumers_revokes_their_keys_and_seed_consumers_stay_deleted_across_restarts() {
    let redis = Redis::start();
    let first = node(&redis);
    first.put_consumer("gone", &consumer_body("c", "p", &[]));
    let (_, k1) = first.create_key("gone", Some(&json!({"name": "one"})));
    let (_, k2) = first.create_key("gone", Some(&json!({"name": "two"})));
    assert_eq!(decided(&first, &k1), 200);
    let deleted = first.expect(200, "DELETE", "/admin/consumers/gone", None);
    assert_eq!(
        deleted,
        json!({"username": "gone", "deleted": true, "revoked_keys": 2})
    );
    for key in [&k1, &k2] {
        assert!(
            refused_within(&first, key, BOUND),
            "a deleted consumer's key"
        );
    }
    assert_not_found(
        &first.call("GET", "/admin/consumers/gone", None),
        "No such consumer",
        "GET deleted",
    );
    assert_not_found(
        &first.call("DELETE", "/admin/consumers/gone", None),
        "No such consumer",
        "DELETE twice",
    );
    assert_not_found(
        &first.call("DELETE", "/admin/consumers/nobody", None),
        "No such consumer",
        "DELETE unknown",
    );

    // A seed consumer: a tombstone without TTL.
    let deleted = first.expect(200, "DELETE", "/admin/consumers/bob", None);
    assert_eq!(
        deleted,
        json!({"username": "bob", "deleted": true, "revoked_keys": 1})
    );
    assert!(refused_within(&first, BOB_KEY, BOUND), "bob's seed key");
    let tombstone: Value =
        serde_json::from_str(&redis.cli(&["GET", "uma:consumer:{bob}"])).expect("tombstone JSON");
    assert_eq!(tombstone["deleted"], true, "{tombstone}");
    assert_eq!(
        pttl(&redis, "uma:consumer:{bob}"),
        -1,
        "the tombstone expires"
    );
    let reload = first.expect(200, "POST", "/admin/reload", None);
    assert_eq!(reload["result"], "ok", "{reload}");
    assert_eq!(first.auth_key(BOB_KEY).status, 401, "back after a reload");
    assert_not_found(
        &first.call("GET", "/admin/consumers/bob", None),
        "No such consumer",
        "after a reload",
    );
    drop(first);

    let second = node(&redis);
    assert_refused(&second.auth_key(BOB_KEY), "bob after a restart");
    assert_not_found(
        &second.call("GET", "/admin/consumers/bob", None),
        "No such consumer",
        "after a restart",
    );
    assert_eq!(pttl(&redis, "uma:consumer:{bob}"), -1);
    assert_eq!(
        usernames(&second.expect(200, "GET", "/admin/consumers", None)),
        ["alice", "carol"]
    );
    assert_eq!(decided(&second, CAROL_KEY), 200, "others unaffected");
    // A PUT replaces the tombstone.
    second.put_consumer("bob", &consumer_body("bob-again", "p-bob2", &[]));
    let bob = second.expect(200, "GET", "/admin/consumers/bob", None);
    assert_eq!(bob["source"], "operator");
    assert_eq!(bob["custom_id"], "bob-again");
}

// ---------------------------------------------------------------------------------------------
// Keys

#[test]
fn created_keys_are_random_shown_once_stored_only_hashed_and_work() {
    let redis = Redis::start();
    let node = node(&redis);
    let shape = regex::Regex::new("^uma_[A-Za-z0-9_-]{43}$").unwrap();
    node.put_consumer("kc", &consumer_body("kc-1", "p-kc", &["g-kc"]));
    let r = node.call(
        "POST",
        "/admin/consumers/kc/keys",
        Some(&json!({"name": "ci"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let created = r.json();
    let id = created["id"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    assert!(shape.is_match(&key), "{key}");
    assert!(!id.is_empty() && !id.contains(&key));
    assert_eq!(created["name"], "ci");
    assert_eq!(created["expires_at"], Value::Null);
    assert!(!created["created"].is_null(), "{created}");

    let r = node.auth_key(&key);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("X-Consumer-Username"), Some("kc"));
    assert_eq!(r.header("X-User-Provider"), Some("p-kc"));
    assert_eq!(r.header("X-Consumer-Groups"), Some("g-kc"));

    assert_eq!(pttl(&redis, &key_record(&key)), -1, "uma:key:<sha256>");
    let got = node.call("GET", "/admin/consumers/kc", None);
    assert!(!got.body.contains(&key) && !got.body.contains(&sha256_hex(&key)));
    let keys = got.json()["keys"].clone();
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    assert_eq!(keys[0]["id"], id.as_str());
    assert_eq!(keys[0]["name"], "ci");
    assert_eq!(keys[0]["disabled"], false);
    assert_eq!(keys[0]["expires_at"], Value::Null);
    assert_eq!(keys[0]["source"], "operator");
    assert_eq!(keys[0]["created"], created["created"]);

    // The same name again: 409, nothing added.
    let r = node.call(
        "POST",
        "/admin/consumers/kc/keys",
        Some(&json!({"name": "ci"})),
    );
    assert_eq!(r.status, 409, "{r:?}");
    assert!(!message(&r).is_empty());
    let listed = node.expect(200, "GET", "/admin/consumers/kc", None);
    assert_eq!(key_ids(&listed).len(), 1);

    // Without a body, ten more: all different, all of the shape.
    let mut keys = BTreeSet::from([key.clone()]);
    let mut ids = BTreeSet::from([id.clone()]);
    for _ in 0..10 {
        let (id, key) = node.create_key("kc", None);
        assert!(shape.is_match(&key), "{key}");
        assert!(keys.insert(key), "a key twice");
        assert!(ids.insert(id), "an id twice");
    }
    let (soon, at) = rfc3339_in(3600);
    let r = node.call(
        "POST",
        "/admin/consumers/kc/keys",
        Some(&json!({"name": "dated", "expires_at": soon})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(parse_time(&r.json()["expires_at"]), at);
    let dated = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(decided(&node, &dated), 200);
    keys.insert(dated);

    let (past, _) = rfc3339_in(-60);
    for expires_at in [json!(past), json!("next tuesday"), json!(12)] {
        assert_invalid_field(
            &node.call(
                "POST",
                "/admin/consumers/kc/keys",
                Some(&json!({"name": "bad", "expires_at": expires_at})),
            ),
            "expires_at",
            &format!("expires_at {expires_at}"),
        );
    }
    let malformed = node.call_raw("POST", "/admin/consumers/kc/keys", br#"{"name":"#);
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_not_found(
        &node.call("POST", "/admin/consumers/nobody/keys", Some(&json!({}))),
        "No such consumer",
        "a key for nobody",
    );
    let listed = node.expect(200, "GET", "/admin/consumers/kc", None);
    assert_eq!(key_ids(&listed).len(), 12, "{listed}");

    // Only hashes in Redis, no plain key in the logs.
    let stored = everything(&redis);
    let logs = node.logs();
    for key in &keys {
        assert!(!stored.contains(key.as_str()), "plain key in Redis: {key}");
        assert!(!logs.contains(key.as_str()), "plain key in the logs: {key}");
        assert_eq!(
            redis.cli(&["EXISTS", &key_record(key)]),
            "1",
            "no uma:key record for {key}"
        );
    }
}

#[test]
fn rotation_hands_over_with_a_grace_period_and_refuses_dead_keys() {
    let redis = Redis::start();
    let node = node(&redis);
    node.put_consumer("rc", &consumer_body("rc-1", "p-rc", &[]));
    let (id1, k1) = node.create_key("rc", Some(&json!({"name": "r"})));

    // Grace 0: the old key is refused at once, the new one works.
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id1}/rotate"),
        Some(&json!({"grace_secs": 0})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let rotated = r.json();
    let id2 = rotated["id"].as_str().expect("id").to_owned();
    let k2 = rotated["key"].as_str().expect("key").to_owned();
    assert_ne!(id2, id1);
    assert_ne!(k2, k1);
    assert!(k2.starts_with("uma_") && k2.len() == 47, "{k2}");
    assert_eq!(rotated["replaces"]["id"], id1.as_str(), "{rotated}");
    assert!(rotated.get("created").is_some(), "{rotated}");
    assert!(refused_within(&node, &k1, BOUND), "rotated with grace 0");
    assert_eq!(decided(&node, &k2), 200);

    // Grace 2 s: both work, the old one until the grace ends.
    let (id6, k6) = node.create_key("rc", Some(&json!({"name": "expiring"})));
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id2}/rotate"),
        Some(&json!({"grace_secs": 2})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let rotated = r.json();
    assert_eq!(rotated["replaces"]["id"], id2.as_str());
    let grace_end = parse_time(&rotated["replaces"]["expires_at"]);
    let now = jiff::Timestamp::now().as_second();
    assert!(
        (now..=now + 4).contains(&grace_end.as_second()),
        "grace ends at {grace_end}, now {now}"
    );
    let id3 = rotated["id"].as_str().unwrap().to_owned();
    let k3 = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(decided(&node, &k2), 200, "within the grace");
    assert_eq!(decided(&node, &k3), 200);
    // Meanwhile a key that expires about with the grace, to rotate once it has.
    let expiry = jiff::Timestamp::from_second(grace_end.as_second() + 1).unwrap();
    let patched = node.expect(
        200,
        "PATCH",
        &format!("/admin/consumers/rc/keys/{id6}"),
        Some(&json!({"expires_at": expiry.to_string()})),
    );
    assert_eq!(parse_time(&patched["expires_at"]), expiry);
    assert_eq!(decided(&node, &k6), 200);
    sleep_until(grace_end);
    assert!(refused_within(&node, &k2, BOUND), "past its grace");
    sleep_until(expiry);
    assert!(refused_within(&node, &k6, BOUND), "past its expiry");
    assert_eq!(decided(&node, &k3), 200);
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id6}/rotate"),
        Some(&json!({})),
    );
    assert_eq!(r.status, 409, "rotating an expired key: {r:?}");
    assert!(!message(&r).is_empty());

    // No body: grace 0.
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id3}/rotate"),
        None,
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id4 = r.json()["id"].as_str().unwrap().to_owned();
    let k4 = r.json()["key"].as_str().unwrap().to_owned();
    assert!(refused_within(&node, &k3, BOUND), "default grace is 0");
    assert_eq!(decided(&node, &k4), 200);

    // A key rotated away is dead: no second rotation.
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id1}/rotate"),
        Some(&json!({})),
    );
    assert!(
        matches!(r.status, 404 | 409),
        "rotating a rotated key: {r:?}"
    );

    // A disabled key: 409.
    let (id5, _) = node.create_key("rc", Some(&json!({"name": "off"})));
    node.expect(
        200,
        "PATCH",
        &format!("/admin/consumers/rc/keys/{id5}"),
        Some(&json!({"disabled": true})),
    );
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id5}/rotate"),
        Some(&json!({})),
    );
    assert_eq!(r.status, 409, "rotating a disabled key: {r:?}");

    // grace_secs out of range or of the wrong type: 422, nothing rotated.
    let before = key_ids(&node.expect(200, "GET", "/admin/consumers/rc", None));
    for grace in [json!(-1), json!(31_536_001), json!("10"), json!(1.5)] {
        assert_invalid_field(
            &node.call(
                "POST",
                &format!("/admin/consumers/rc/keys/{id4}/rotate"),
                Some(&json!({"grace_secs": grace})),
            ),
            "grace_secs",
            &format!("grace_secs {grace}"),
        );
    }
    assert_eq!(
        key_ids(&node.expect(200, "GET", "/admin/consumers/rc", None)),
        before
    );
    assert_eq!(decided(&node, &k4), 200);
    let r = node.call(
        "POST",
        &format!("/admin/consumers/rc/keys/{id4}/rotate"),
        Some(&json!({"grace_secs": 31_536_000})),
    );
    assert_eq!(r.status, 201, "the longest grace: {r:?}");
    assert_eq!(decided(&node, &k4), 200, "a year of grace");

    assert_not_found(
        &node.call(
            "POST",
            "/admin/consumers/rc/keys/no-such-id/rotate",
            Some(&json!({})),
        ),
        "No such key",
        "rotate an unknown id",
    );
    assert_not_found(
        &node.call(
            "POST",
            &format!("/admin/consumers/nobody/keys/{id4}/rotate"),
            Some(&json!({})),
        ),
        "No such consumer",
        "rotate for nobody",
    );
}

#[test]
fn patch_disables_reenables_and_expires_a_key() {
    let redis = Redis::start();
    let node = node(&redis);
    node.put_consumer("pc", &consumer_body("pc-1", "p-pc", &[]));
    let (id, key) = node.create_key("pc", Some(&json!({"name": "p"})));
    let path = format!("/admin/consumers/pc/keys/{id}");
    let unknown = node.auth_key("no-such-key-at-all");

    let off = node.expect(200, "PATCH", &path, Some(&json!({"disabled": true})));
    let fields: BTreeSet<&str> = off
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for field in ["id", "name", "created", "expires_at", "disabled", "source"] {
        assert!(fields.contains(field), "{field} missing: {off}");
    }
    let text = off.to_string();
    assert!(
        !text.contains(&key) && !text.contains(&sha256_hex(&key)),
        "a key or its hash in the answer: {off}"
    );
    assert_eq!(off["id"], id.as_str());
    assert_eq!(off["name"], "p");
    assert_eq!(off["disabled"], true);
    assert_eq!(off["expires_at"], Value::Null);
    assert_eq!(off["source"], "operator");
    assert!(refused_within(&node, &key, BOUND), "disabled");
    let r = node.auth_key(&key);
    assert_eq!(
        r.header("WWW-Authenticate"),
        unknown.header("WWW-Authenticate"),
        "a disabled key answers as an unknown one"
    );
    let listed = node.expect(200, "GET", "/admin/consumers/pc", None);
    assert_eq!(listed["keys"][0]["disabled"], true);

    let on = node.expect(200, "PATCH", &path, Some(&json!({"disabled": false})));
    assert_eq!(on["disabled"], false);
    assert!(allowed_within(&node, &key, BOUND), "re-enabled");

    let (later, at) = rfc3339_in(3600);
    let dated = node.expect(200, "PATCH", &path, Some(&json!({"expires_at": later})));
    assert_eq!(parse_time(&dated["expires_at"]), at);
    assert_eq!(
        dated["disabled"], false,
        "a PATCH changes only what it names"
    );
    let cleared = node.expect(200, "PATCH", &path, Some(&json!({"expires_at": null})));
    assert_eq!(cleared["expires_at"], Value::Null);
    assert_eq!(decided(&node, &key), 200);

    for (body, field) in [
        (json!({"disabled": "yes"}), "disabled"),
        (json!({"disabled": 1}), "disabled"),
        (json!({"expires_at": 5}), "expires_at"),
        (json!({"expires_at": "garbage"}), "expires_at"),
    ] {
        assert_invalid_field(
            &node.call("PATCH", &path, Some(&body)),
            field,
            &format!("PATCH {body}"),
        );
    }
    let malformed = node.call_raw("PATCH", &path, b"{disabled: true}");
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_eq!(
        node.auth_key(&key).status,
        200,
        "refused PATCHes change nothing"
    );
    assert_not_found(
        &node.call(
            "PATCH",
            "/admin/consumers/pc/keys/no-such-id",
            Some(&json!({"disabled": true})),
        ),
        "No such key",
        "PATCH unknown id",
    );
    assert_not_found(
        &node.call(
            "PATCH",
            &format!("/admin/consumers/nobody/keys/{id}"),
            Some(&json!({"disabled": true})),
        ),
        "No such consumer",
        "PATCH for nobody",
    );

    // Expiry: works until then, refused (like an unknown key) from then on.
    let (soon, at) = rfc3339_in(3);
    let dated = node.expect(200, "PATCH", &path, Some(&json!({"expires_at": soon})));
    assert_eq!(parse_time(&dated["expires_at"]), at);
    assert_eq!(decided(&node, &key), 200, "before its expiry");
    sleep_until(at);
    assert!(refused_within(&node, &key, BOUND), "expired");
}

#[test]
fn revoking_a_key_refuses_it_and_works_on_seed_keys_across_restarts() {
    let redis = Redis::start();
    let first = node(&redis);
    first.put_consumer("vc", &consumer_body("vc-1", "p-vc", &[]));
    let (id, key) = first.create_key("vc", Some(&json!({"name": "v"})));
    let (_, kept) = first.create_key("vc", Some(&json!({"name": "kept"})));
    let path = format!("/admin/consumers/vc/keys/{id}");
    let revoked = first.expect(200, "DELETE", &path, None);
    assert_eq!(revoked, json!({"id": id, "revoked": true}));
    assert!(refused_within(&first, &key, BOUND), "revoked");
    assert_eq!(decided(&first, &kept), 200, "the other key");
    assert_not_found(
        &first.call("DELETE", &path, None),
        "No such key",
        "revoke twice",
    );
    let listed = first.expect(200, "GET", "/admin/consumers/vc", None);
    assert!(!key_ids(&listed).contains(&id), "{listed}");
    assert_not_found(
        &first.call(
            "DELETE",
            &format!("/admin/consumers/nobody/keys/{id}"),
            None,
        ),
        "No such consumer",
        "revoke for nobody",
    );

    // A seed key.
    let seed_id = seed_key_id(ALICE_KEY);
    let revoked = first.expect(
        200,
        "DELETE",
        &format!("/admin/consumers/alice/keys/{seed_id}"),
        None,
    );
    assert_eq!(revoked, json!({"id": seed_id, "revoked": true}));
    assert!(refused_within(&first, ALICE_KEY, BOUND), "revoked seed key");
    let alice = first.expect(200, "GET", "/admin/consumers/alice", None);
    assert!(!key_ids(&alice).contains(&seed_id), "{alice}");
    let reload = first.expect(200, "POST", "/admin/reload", None);
    assert_eq!(reload["result"], "ok");
    assert_refused(&first.auth_key(ALICE_KEY), "after a reload");
    drop(first);

    let second = node(&redis);
    assert_refused(&second.auth_key(ALICE_KEY), "after a restart");
    assert_refused(&second.auth_key(&key), "revoked key after a restart");
    assert_eq!(decided(&second, &kept), 200);
    assert_eq!(decided(&second, BOB_KEY), 200, "other seed keys");
    let alice = second.expect(200, "GET", "/admin/consumers/alice", None);
    assert!(!key_ids(&alice).contains(&seed_id), "{alice}");
}

// ---------------------------------------------------------------------------------------------
// Audit

#[test]
fn the_audit_trail_names_actor_action_target_and_outcome_newest_first() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let named = "ops-team-token-0123456789abcdef-0123456789";
    let unnamed = "plain-token-0123456789abcdef-0123456789ab";
    let tokens = write_file(
        dir.path(),
        "tokens",
        &format!("ops-team {named}\n{unnamed}\n"),
    );
    let options = NodeOptions {
        env: vec![("UMA_ADMIN__TOKEN_FILE".into(), tokens.display().to_string())],
        ..NodeOptions::default()
    };
    let node = Node::start_with(Some(&redis), &seed(), &options);
    let base = audit_len(&redis);
    let step = |expected: u64, what: &str| {
        assert_eq!(audit_len(&redis), base + expected, "XLEN after {what}");
    };

    let r = node.call_as(
        named,
        "PUT",
        "/admin/consumers/au",
        Some(&consumer_body("au", "p", &[])),
    );
    assert_eq!(r.status, 201, "{r:?}");
    step(1, "PUT");
    let r = node.call_as(
        unnamed,
        "POST",
        "/admin/consumers/au/keys",
        Some(&json!({})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let old = r.json()["id"].as_str().unwrap().to_owned();
    step(2, "key create");
    let rotated = node.expect(
        201,
        "POST",
        &format!("/admin/consumers/au/keys/{old}/rotate"),
        Some(&json!({"grace_secs": 60})),
    );
    let new = rotated["id"].as_str().unwrap().to_owned();
    step(3, "rotate");
    node.expect(
        200,
        "PATCH",
        &format!("/admin/consumers/au/keys/{new}"),
        Some(&json!({"disabled": true})),
    );
    step(4, "patch");
    node.expect(
        200,
        "DELETE",
        &format!("/admin/consumers/au/keys/{new}"),
        None,
    );
    step(5, "revoke");
    node.expect(200, "DELETE", "/admin/consumers/au", None);
    step(6, "consumer delete");
    let reload = node.expect(200, "POST", "/admin/reload", None);
    assert_eq!(reload["result"], "ok");
    step(7, "reload");

    let audit = node.expect(200, "GET", "/admin/audit", None);
    let entries = audit["entries"].as_array().expect("entries").clone();
    assert!(entries.len() >= 7, "{audit}");
    let newest: Vec<&Value> = entries.iter().take(7).collect();
    let expected = [
        ("seed.reload", "admin", None),
        ("consumer.delete", "admin", Some("au".to_owned())),
        ("key.revoke", "admin", Some(format!("au/{new}"))),
        ("key.patch", "admin", Some(format!("au/{new}"))),
        ("key.rotate", "admin", None),
        ("key.create", "admin", Some(format!("au/{old}"))),
        ("consumer.put", "ops-team", Some("au".to_owned())),
    ];
    for (entry, (action, actor, target)) in newest.iter().zip(&expected) {
        for field in ["id", "time", "actor", "action", "target", "outcome"] {
            assert!(entry.get(field).is_some(), "{field} missing: {entry}");
        }
        assert_eq!(entry["action"], *action, "{audit}");
        assert_eq!(entry["actor"], *actor, "{entry}");
        if let Some(target) = target {
            assert_eq!(entry["target"], target.as_str(), "{entry}");
        }
        if *action != "seed.reload" {
            assert_eq!(entry["outcome"], "ok", "{entry}");
        }
    }
    let rotate_target = newest[4]["target"].as_str().unwrap_or_default();
    assert!(
        rotate_target == format!("au/{old}") || rotate_target == format!("au/{new}"),
        "{}",
        newest[4]
    );
    let ids: Vec<&str> = newest.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 7, "ids repeat");

    // since: strictly newer entries; limit: the newest.
    let since = node.expect(200, "GET", &format!("/admin/audit?since={}", ids[3]), None);
    let since_ids: Vec<&str> = since["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(since_ids, ids[..3], "{since}");
    let limited = node.expect(200, "GET", "/admin/audit?limit=2", None);
    let limited_ids: Vec<&str> = limited["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(limited_ids, ids[..2]);
    for limit in ["0", "1001", "many"] {
        let r = node.call("GET", &format!("/admin/audit?limit={limit}"), None);
        assert_eq!(r.status, 400, "limit={limit}: {r:?}");
    }

    let logs = node.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("key.create") && l.contains(&format!("au/{old}"))),
        "the audit entry is not logged:\n{logs}"
    );
    for token in [named, unnamed, TOKEN] {
        assert!(!logs.contains(token), "a token in the logs");
    }
}

#[test]
fn the_audit_stream_is_capped() {
    let redis = Redis::start();
    let options = NodeOptions {
        env: vec![("UMA_ADMIN__AUDIT_MAX_ENTRIES".into(), "10".into())],
        ..NodeOptions::default()
    };
    let node = Node::start_with(Some(&redis), &seed(), &options);
    for i in 0..300 {
        node.put_consumer("capped", &json!({"custom_id": format!("c-{i}")}));
    }
    let len = audit_len(&redis);
    assert!(len >= 1, "no audit entries");
    assert!(
        len < 150,
        "uma:audit not capped: {len} entries for 300 writes"
    );
    let audit = node.expect(200, "GET", "/admin/audit?limit=1", None);
    assert_eq!(audit["entries"][0]["action"], "consumer.put");
}

// ---------------------------------------------------------------------------------------------
// Without Redis

#[test]
fn embedded_mode_serves_reads_from_the_seed_and_refuses_writes() {
    let node = Node::start(None, &seed());
    let list = node.expect(200, "GET", "/admin/consumers", None);
    assert_eq!(usernames(&list), ["alice", "bob", "carol"]);
    assert!(
        list["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["source"] == "seed"),
        "{list}"
    );
    let alice = node.expect(200, "GET", "/admin/consumers/alice", None);
    assert_eq!(alice["source"], "seed");
    assert_eq!(key_ids(&alice), [seed_key_id(ALICE_KEY)]);

    let seed_id = seed_key_id(ALICE_KEY);
    let body = consumer_body("x", "p", &[]);
    let writes: Vec<(&str, String, Option<Value>)> = vec![
        ("PUT", "/admin/consumers/alice".into(), Some(body.clone())),
        ("PUT", "/admin/consumers/newc".into(), Some(body)),
        ("DELETE", "/admin/consumers/bob".into(), None),
        (
            "POST",
            "/admin/consumers/alice/keys".into(),
            Some(json!({"name": "n"})),
        ),
        (
            "POST",
            format!("/admin/consumers/alice/keys/{seed_id}/rotate"),
            Some(json!({})),
        ),
        (
            "PATCH",
            format!("/admin/consumers/alice/keys/{seed_id}"),
            Some(json!({"disabled": true})),
        ),
        (
            "DELETE",
            format!("/admin/consumers/alice/keys/{seed_id}"),
            None,
        ),
    ];
    for (method, path, body) in &writes {
        let r = node.call(method, path, body.as_ref());
        assert_eq!(r.status, 503, "{method} {path}: {r:?}");
        assert_eq!(
            r.json(),
            json!({"message": "Embedded mode (no Redis): admin writes need Redis"})
        );
    }
    assert_eq!(decided(&node, ALICE_KEY), 200);
    assert_eq!(decided(&node, BOB_KEY), 200);
    assert_eq!(
        node.auth_key(ALICE_KEY).header("X-User-Provider"),
        Some("p-alice")
    );
    node.expect(200, "GET", "/admin/consumers/bob", None);
    assert_not_found(
        &node.call("GET", "/admin/consumers/newc", None),
        "No such consumer",
        "nothing created",
    );
}

/// What the admin owns in Redis for `username`: its record, its key set, and every key record
/// without a TTL.
fn admin_state(redis: &Redis, username: &str) -> Value {
    // A TTL counts down between two looks: compare only whether there is one.
    let without_ttl = |records: std::collections::BTreeMap<String, Value>| {
        records
            .into_iter()
            .map(|(k, mut v)| {
                v["pttl"] = json!(v["pttl"] == -1);
                (k, v)
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let consumer = without_ttl(dump(redis, &format!("uma:consumer:{{{username}}}")));
    let keys = without_ttl(dump(redis, &format!("uma:consumer-keys:{{{username}}}")));
    json!({
        "consumer": consumer,
        "consumer_keys": keys,
        "key_records": operator_key_records(redis),
    })
}

#[test]
fn with_redis_down_every_write_answers_503_and_nothing_is_applied() {
    let mut redis = Redis::start();
    let node = node(&redis);
    node.put_consumer("dc", &consumer_body("dc-1", "p-dc", &[]));
    let (id, key) = node.create_key("dc", Some(&json!({"name": "d"})));
    assert_eq!(decided(&node, &key), 200);
    let before = admin_state(&redis, "dc");
    assert_ne!(before["consumer"], json!({}), "{before}");
    let xlen = audit_len(&redis);
    let shown = node.expect(200, "GET", "/admin/consumers/dc", None);

    redis.kill();
    let seed_id = seed_key_id(ALICE_KEY);
    let writes: Vec<(&str, String, Option<Value>)> = vec![
        (
            "PUT",
            "/admin/consumers/dc".into(),
            Some(consumer_body("dc-2", "p-dc2", &[])),
        ),
        (
            "PUT",
            "/admin/consumers/fresh".into(),
            Some(consumer_body("f", "p", &[])),
        ),
        ("DELETE", "/admin/consumers/dc".into(), None),
        ("DELETE", "/admin/consumers/alice".into(), None),
        (
            "POST",
            "/admin/consumers/dc/keys".into(),
            Some(json!({"name": "new"})),
        ),
        (
            "POST",
            format!("/admin/consumers/dc/keys/{id}/rotate"),
            Some(json!({"grace_secs": 0})),
        ),
        (
            "PATCH",
            format!("/admin/consumers/dc/keys/{id}"),
            Some(json!({"disabled": true})),
        ),
        ("DELETE", format!("/admin/consumers/dc/keys/{id}"), None),
        (
            "DELETE",
            format!("/admin/consumers/alice/keys/{seed_id}"),
            None,
        ),
    ];
    for (method, path, body) in &writes {
        let r = node.call(method, path, body.as_ref());
        assert_eq!(r.status, 503, "{method} {path}: {r:?}");
        assert_eq!(
            r.json(),
            json!({"message": "Redis is unavailable: admin writes need Redis and were not applied"}),
            "{method} {path}"
        );
    }

    redis.restart();
    let reconnected = poll(Duration::from_secs(10), || {
        node.get("/readyz", &[]).json()["redis"]["connected"] == true
    });
    assert!(reconnected.is_some(), "never reconnected");
    // Room for anything queued during the outage to (wrongly) land.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(admin_state(&redis, "dc"), before, "something was written");
    assert_eq!(audit_len(&redis), xlen, "audit entries of refused writes");
    assert_eq!(redis.cli(&["EXISTS", "uma:consumer:{fresh}"]), "0");
    assert_eq!(node.expect(200, "GET", "/admin/consumers/dc", None), shown);
    assert_not_found(
        &node.call("GET", "/admin/consumers/fresh", None),
        "No such consumer",
        "not created",
    );
    let r = node.auth_key(&key);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("X-Consumer-Custom-ID"), Some("dc-1"));
    assert_eq!(decided(&node, ALICE_KEY), 200);
    // And writes work again.
    node.expect(
        200,
        "PATCH",
        &format!("/admin/consumers/dc/keys/{id}"),
        Some(&json!({"disabled": true})),
    );
    assert_eq!(audit_len(&redis), xlen + 1);
}

#[test]
fn a_wrong_typed_record_fails_the_key_write_whole() {
    let redis = Redis::start();
    let node = node(&redis);
    node.put_consumer("wt", &consumer_body("wt-1", "p-wt", &[]));
    redis.cli(&["DEL", "uma:consumer-keys:{wt}"]);
    redis.cli(&["SET", "uma:consumer-keys:{wt}", "x"]);
    let key_names = |redis: &Redis| {
        dump(redis, "uma:key:*")
            .into_keys()
            .collect::<BTreeSet<_>>()
    };
    let before = key_names(&redis);
    let r = node.call(
        "POST",
        "/admin/consumers/wt/keys",
        Some(&json!({"name": "w"})),
    );
    assert!(
        r.status >= 500 || r.status == 409,
        "a key written over a wrong-typed record: {r:?}"
    );
    assert!(r.json()["message"].is_string(), "{r:?}");
    assert_eq!(
        key_names(&redis),
        before,
        "a key record was written by a failed write"
    );
    assert_eq!(redis.cli(&["GET", "uma:consumer-keys:{wt}"]), "x");
    // The wrong type was the reason: without it the same call works.
    redis.cli(&["DEL", "uma:consumer-keys:{wt}"]);
    let (_, key) = node.create_key("wt", Some(&json!({"name": "w"})));
    assert_eq!(decided(&node, &key), 200);
}

// ---------------------------------------------------------------------------------------------
// Invalidation across replicas (SPEC §10): three replicas at the default cache.local_ttl_ms
// (5000), so only invalidation can explain a change seen within 1 s.

fn replicas(redis: &Redis) -> Replicas {
    Replicas::start(redis, 3, &seed(), &NodeOptions::default())
}

#[test]
fn key_changes_on_one_replica_reach_all_three_within_a_second() {
    let redis = Redis::start();
    let replicas = replicas(&redis);
    let nodes = all(&replicas);
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
    a.put_consumer("iv", &consumer_body("iv-1", "p-iv", &[]));
    warm(&nodes, ALICE_KEY);

    // Created on A: works everywhere (a first miss may read Redis).
    let (id, key) = a.create_key("iv", Some(&json!({"name": "k"})));
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&key).status == 200),
        "created key",
    );
    warm(&nodes, &key);
    let path = format!("/admin/consumers/iv/keys/{id}");

    // Disabled on B, re-enabled on C.
    b.expect(200, "PATCH", &path, Some(&json!({"disabled": true})));
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&key).status == 401),
        "disabled",
    );
    c.expect(200, "PATCH", &path, Some(&json!({"disabled": false})));
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&key).status == 200),
        "re-enabled",
    );
    warm(&nodes, &key);

    // Expiring in 2-3 s (set on A): refused on all within a second of the expiry.
    let (soon, at) = rfc3339_in(3);
    a.expect(200, "PATCH", &path, Some(&json!({"expires_at": soon})));
    warm(&nodes, &key);
    sleep_until(at);
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&key).status == 401),
        "expired",
    );
    for node in &nodes {
        assert_refused(&node.auth_key(&key), "expired");
    }

    // Rotated on B with a 3 s grace: the new key everywhere, the old one until the grace ends.
    let (id2, k2) = a.create_key("iv", Some(&json!({"name": "k2"})));
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&k2).status == 200),
        "second key",
    );
    warm(&nodes, &k2);
    let rotated = b.expect(
        201,
        "POST",
        &format!("/admin/consumers/iv/keys/{id2}/rotate"),
        Some(&json!({"grace_secs": 3})),
    );
    let k3 = rotated["key"].as_str().unwrap().to_owned();
    let id3 = rotated["id"].as_str().unwrap().to_owned();
    let grace_end = parse_time(&rotated["replaces"]["expires_at"]);
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&k3).status == 200),
        "rotated-in key",
    );
    warm(&nodes, &k2);
    sleep_until(grace_end);
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&k2).status == 401),
        "past the grace",
    );
    warm(&nodes, &k3);

    // Revoked on C.
    c.expect(
        200,
        "DELETE",
        &format!("/admin/consumers/iv/keys/{id3}"),
        None,
    );
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&k3).status == 401),
        "revoked",
    );
    // Deleting the consumer on A revokes a key B and C have cached.
    let (_, k4) = a.create_key("iv", Some(&json!({"name": "k4"})));
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&k4).status == 200),
        "fourth key",
    );
    warm(&nodes, &k4);
    a.expect(200, "DELETE", "/admin/consumers/iv", None);
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&k4).status == 401),
        "consumer deleted",
    );
}

#[test]
fn revocation_reaches_the_other_replicas_within_a_second_over_twenty_trials() {
    let redis = Redis::start();
    let replicas = replicas(&redis);
    replicas[0].put_consumer("rv", &consumer_body("rv-1", "p-rv", &[]));
    let mut worst_per_trial = Vec::new();
    for trial in 0..20 {
        // The writer changes from trial to trial; the other two are polled.
        let writer = &replicas[trial % 3];
        let others: Vec<&Node> = (0..3)
            .filter(|i| *i != trial % 3)
            .map(|i| &replicas[i])
            .collect();
        let (id, key) = writer.create_key("rv", Some(&json!({"name": format!("t{trial}")})));
        assert_all(
            &on_all(&others, BOUND, |n| n.auth_key(&key).status == 200),
            "created key",
        );
        warm(&others, &key);
        writer.expect(
            200,
            "DELETE",
            &format!("/admin/consumers/rv/keys/{id}"),
            None,
        );
        let took = on_all(&others, BOUND, |n| n.auth_key(&key).status == 401);
        assert!(
            took.iter().all(Option::is_some),
            "trial {trial}: a revoked key still served after 1 s: {took:?}"
        );
        worst_per_trial.push(took.into_iter().flatten().max().unwrap());
    }
    let mut sorted = worst_per_trial.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let worst = *sorted.last().unwrap();
    println!("revocation on the other replicas over 20 trials: median {median:?}, worst {worst:?}");
    assert!(worst < BOUND, "worst {worst:?}");
}

#[test]
fn metadata_and_limit_changes_reach_every_replica_within_a_second() {
    let redis = Redis::start();
    let replicas = replicas(&redis);
    let nodes = all(&replicas);
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
    a.put_consumer("mc", &consumer_body("mc-1", "p-one", &["g1"]));
    let (_, key) = a.create_key("mc", Some(&json!({"name": "m"})));
    assert_all(
        &on_all(&nodes, BOUND, |n| n.auth_key(&key).status == 200),
        "created key",
    );
    warm(&nodes, &key);
    for node in &nodes {
        assert_eq!(node.auth_key(&key).header("X-User-Provider"), Some("p-one"));
    }

    a.put_consumer("mc", &consumer_body("mc-2", "p-two", &["g1", "g2"]));
    assert_all(
        &on_all(&nodes, BOUND, |n| {
            let r = n.auth_key(&key);
            r.header("X-User-Provider") == Some("p-two")
                && r.header("X-Consumer-Groups") == Some("g1, g2")
                && r.header("X-Consumer-Custom-ID") == Some("mc-2")
        }),
        "changed metadata list",
    );
    warm(&nodes, &key);

    // One request a minute, set on A: B and C refuse the second call within a second.
    let mut limited = consumer_body("mc-3", "p-two", &["g1", "g2"]);
    limited["metadata_list"][0]["limits"] = json!({"requests_per_minute": 1});
    a.put_consumer("mc", &limited);
    let took = on_all(&[b, c], BOUND, |n| n.auth_key(&key).status == 429);
    assert_all(&took, "changed limit");
    // (Polled: a new minute may allow one more call.)
    assert!(poll(BOUND, || b.auth_key(&key).status == 429).is_some());
    let r = b.auth_key(&key);
    if r.status == 429 {
        assert_eq!(r.json(), json!({"message": "API rate limit exceeded"}));
    }
}

#[test]
fn a_killed_subscription_is_replaced_and_a_revocation_still_reaches_the_replica() {
    let redis = Redis::start();
    let replicas = replicas(&redis);
    let (a, b) = (&replicas[0], &replicas[1]);
    a.put_consumer("ps", &consumer_body("ps-1", "p-ps", &[]));
    let (id, key) = a.create_key("ps", Some(&json!({"name": "p"})));
    assert!(allowed_within(b, &key, BOUND), "created key on B");
    warm(&[b], &key);

    let clients = pubsub_clients_of(&redis, b.pid());
    assert!(
        !clients.is_empty(),
        "B holds no pub/sub connection: {}",
        redis.cli(&["CLIENT", "LIST"])
    );
    for client in &clients {
        redis.cli(&["CLIENT", "KILL", "ID", client]);
    }
    a.expect(
        200,
        "DELETE",
        &format!("/admin/consumers/ps/keys/{id}"),
        None,
    );
    let took = poll(Duration::from_secs(2), || b.auth_key(&key).status == 401);
    println!("revocation on B with its subscription killed: {took:?}");
    assert!(
        took.is_some(),
        "B served a revoked key 2 s after a lost message"
    );

    // B subscribes again by itself; then invalidation is back to its 1 s bound.
    let _ = poll(Duration::from_secs(5), || {
        let now = pubsub_clients_of(&redis, b.pid());
        !now.is_empty() && now.iter().all(|c| !clients.contains(c))
    });
    let (id2, k2) = a.create_key("ps", Some(&json!({"name": "p2"})));
    assert!(allowed_within(b, &k2, BOUND), "second key on B");
    warm(&[b], &k2);
    a.expect(
        200,
        "DELETE",
        &format!("/admin/consumers/ps/keys/{id2}"),
        None,
    );
    let took = poll(BOUND, || b.auth_key(&k2).status == 401);
    println!("revocation on B after it resubscribed: {took:?}");
    assert!(took.is_some(), "B no longer receives invalidations");
}

/// The issue's own fault: every replica's subscription killed at once (`CLIENT KILL TYPE pubsub`)
/// while a key is revoked. The message is lost for all of them; each resubscribes and flushes.
#[test]
fn client_kill_type_pubsub_during_a_revocation_still_refuses_on_every_replica() {
    let redis = Redis::start();
    let replicas = replicas(&redis);
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
    a.put_consumer("kt", &consumer_body("kt-1", "p-kt", &[]));
    let (id, key) = a.create_key("kt", Some(&json!({"name": "k"})));
    assert!(allowed_within(b, &key, BOUND), "created key on B");
    assert!(allowed_within(c, &key, BOUND), "created key on C");
    warm(&[b, c], &key);

    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    a.expect(
        200,
        "DELETE",
        &format!("/admin/consumers/kt/keys/{id}"),
        None,
    );
    for (name, node) in [("B", b), ("C", c)] {
        let took = poll(Duration::from_secs(2), || node.auth_key(&key).status == 401);
        println!("{name}: revoked key refused after CLIENT KILL TYPE pubsub: {took:?}");
        assert!(
            took.is_some(),
            "{name} served a revoked key 2 s after its subscription was killed"
        );
    }
    let back = poll(Duration::from_secs(5), || subscribers(&redis) == 3);
    assert!(back.is_some(), "the replicas did not all subscribe again");
}
