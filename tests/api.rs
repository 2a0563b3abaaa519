//! `/api/user-metadata`, `/api/tdl-matrix`, `/healthz`, `/readyz`, `/metrics` and the CLI's process
//! behaviour (SIGTERM, hash-key, config errors), against the real binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn user_metadata_lists_the_callers_entries() {
    let service = Service::bundled();
    let r = service.get("/api/user-metadata", &[("apikey", USER1_KEY)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let entry = &list[0];
    assert_eq!(entry["id"], "kt-midm-base");
    assert_eq!(entry["provider_name"], "kt");
    assert_eq!(entry["tags"], serde_json::json!(["kt", "믿음"]));
    assert_eq!(
        entry["tdl_matrix"]["T12"],
        serde_json::json!([0, 0, 0, 0, 0, 3, 0, 0, 0, 0])
    );
    assert_eq!(entry["capabilities"], serde_json::json!([1, 1, 0, 0, 0]));
    assert_eq!(entry["max_input_tokens"], 50000);
    assert_eq!(entry["max_output_tokens"], 20000);
    assert_eq!(entry["input_cost_per_token"], 5e-8);
    assert_eq!(entry["output_cost_per_token"], 2e-7);
    let admin = service
        .get(&format!("/api/user-metadata?apikey={ADMIN_KEY}"), &[])
        .json();
    let ids: Vec<&str> = admin
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kt-midm-base", "azure-gpt4o"]);
    let post = request(
        service.addr,
        "POST",
        "/api/user-metadata",
        &[("x-api-key", ADMIN_KEY), ("Content-Length", "0")],
    );
    assert_eq!(post.status, 200);
}

#[test]
fn user_metadata_uses_the_route_list_for_consumers_without_one() {
    let seed = format!(
        "consumers:\n  - username: bare\n    keyauth_credentials: [{{key: bk}}]\nroutes:\n  - name: api\n    paths: [/api/user-metadata, /api/tdl-matrix]\n{}",
        metadata_plugin(&[("default-metadata", "default")])
    );
    let service = Service::with_files("", &seed);
    let list = service
        .get("/api/user-metadata", &[("apikey", "bk")])
        .json();
    assert_eq!(list[0]["id"], "default-metadata");
    let tdl = service.get("/api/tdl-matrix", &[("apikey", "bk")]).json();
    assert_eq!(tdl["entries"][0]["id"], "default-metadata");
}

#[test]
fn api_endpoints_refuse_like_auth() {
    let service = Service::bundled();
    for path in ["/api/user-metadata", "/api/tdl-matrix"] {
        let r = service.get(path, &[]);
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["message"], "No API key found in request");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Key realm="user-metadata-auth""#)
        );
        let r = service.get(path, &[("apikey", "nope")]);
        assert_eq!(r.json()["message"], "Invalid authentication credentials");
        let r = service.get(path, &[("apikey", "a"), ("apikey", "b")]);
        assert_eq!(r.json()["message"], "Duplicate API key found");
        let r = request(service.addr, "OPTIONS", path, &[]);
        assert_eq!(r.status, 204);
        assert_eq!(r.header("allow"), Some("GET, POST, OPTIONS"));
        let r = request(service.addr, "PUT", path, &[("apikey", USER1_KEY)]);
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, POST, OPTIONS"));
    }
}

fn usage_total(tdl: &serde_json::Value, id: &str) -> u64 {
    let entry = tdl["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("{id} in {tdl}"));
    entry["usage"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[test]
fn tdl_matrix_counts_allowed_auth_calls_only() {
    let service = Service::bundled();
    for _ in 0..5 {
        assert_eq!(service.auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
    }
    for _ in 0..3 {
        assert_eq!(service.auth(ADMIN_KEY, "/midm-base/chat").status, 200);
    }
    assert_eq!(service.auth(USER1_KEY, "/gpt4o/chat").status, 403);
    service.get("/api/user-metadata", &[("apikey", ADMIN_KEY)]);
    let r = service.get("/api/tdl-matrix", &[("apikey", ADMIN_KEY)]);
    assert_eq!(r.status, 200);
    let tdl = r.json();
    assert_eq!(tdl["timezone"], "UTC");
    let today = tdl["date"].as_str().unwrap();
    assert_eq!(today.len(), 10, "{today}");
    let slot = tdl["slot"].as_str().unwrap();
    assert!(slot.starts_with('T'));
    assert_eq!(usage_total(&tdl, "azure-gpt4o"), 5);
    assert_eq!(usage_total(&tdl, "kt-midm-base"), 3);
    let azure = tdl["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "azure-gpt4o")
        .unwrap();
    assert_eq!(azure["usage"][slot], 5);
    assert_eq!(azure["provider_name"], "azure");
    assert_eq!(
        azure["tdl_matrix"]["T1"],
        serde_json::json!([3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    );
    let keys: Vec<&String> = azure["usage"].as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 12);
    // user1's refused call counted nothing.
    let user1 = service
        .get("/api/tdl-matrix", &[("apikey", USER1_KEY)])
        .json();
    assert_eq!(usage_total(&user1, "kt-midm-base"), 0);
}

#[test]
fn tdl_matrix_shows_entries_used_from_other_lists() {
    let seed = format!(
        "consumers:\n  - username: bare\n    keyauth_credentials: [{{key: bk}}]\nroutes:\n  - name: special\n    paths: [/special]\n{}plugins:\n  - name: user-metadata\n    config:\n      metadata_list:\n{}",
        metadata_plugin(&[("route-a", "r")]),
        entry_yaml("global-a", "g")
            .replace("\n              ", "\n          ")
            .replace("            - id", "        - id"),
    );
    let service = Service::with_files("", &seed);
    assert_eq!(
        service.auth("bk", "/special/x").header("x-consumer-id"),
        Some("route-a")
    );
    assert_eq!(
        service.auth("bk", "/other").header("x-consumer-id"),
        Some("global-a")
    );
    let tdl = service.get("/api/tdl-matrix", &[("apikey", "bk")]).json();
    let entries = tdl["entries"].as_array().unwrap();
    assert_eq!(
        entries[0]["id"], "global-a",
        "the applicable list first: {tdl}"
    );
    assert_eq!(entries[0]["provider_name"], "g");
    assert_eq!(usage_total(&tdl, "global-a"), 1);
    // Described from the first list that holds it (SPEC §6): here the seed route's list.
    let other = &entries[1];
    assert_eq!(other["id"], "route-a");
    assert_eq!(other["provider_name"], "r");
    assert!(other["tdl_matrix"]["T1"].is_array(), "{tdl}");
    assert_eq!(usage_total(&tdl, "route-a"), 1);
}

#[test]
fn health_readiness_metrics_and_unknown_paths() {
    let service = Service::bundled();
    assert_eq!(service.get("/healthz", &[]).status, 200);
    let ready = service.get("/readyz", &[]);
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.body,
        r#"{"ready":true,"redis":{"configured":false,"connected":false}}"#
    );
    service.auth(USER1_KEY, "/midm-base/chat");
    service.auth(USER1_KEY, "/gpt4o/chat");
    service.get("/auth/x", &[]);
    service.get("/auth", &[]);
    let metrics = service.get("/metrics", &[]);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.body;
    for line in [
        r#"uma_requests_total{endpoint="auth",decision="allow"} 1"#,
        r#"uma_requests_total{endpoint="auth",decision="forbidden"} 1"#,
        r#"uma_requests_total{endpoint="auth",decision="no_key"} 1"#,
        r#"uma_requests_total{endpoint="auth",decision="bad_request"} 1"#,
        "uma_consumers_loaded 2",
        "uma_keys_loaded 2",
        "uma_tdl_increments_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    assert!(
        text.contains(r#"uma_request_duration_seconds_bucket{endpoint="auth",le="0.001"}"#),
        "{text}"
    );
    assert!(!text.contains("quantile="), "histograms, not summaries");
    let missing = service.get("/nope", &[]);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["message"], "Not found");
    assert_eq!(request(service.addr, "POST", "/healthz", &[]).status, 405);
}

#[test]
fn sigterm_stops_cleanly() {
    let service = Service::bundled();
    assert_eq!(service.auth(USER1_KEY, "/midm-base/chat").status, 200);
    // An idle keep-alive connection must not hold the shutdown open past the grace period.
    let _idle = std::net::TcpStream::connect(service.addr).unwrap();
    let started = Instant::now();
    let status = service
        .terminate(Duration::from_secs(8))
        .expect("exited after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(7));
}

#[test]
fn hash_key_prints_the_stored_form() {
    let out = Command::new(BIN)
        .args(["hash-key", "abc"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
    let mut child = Command::new(BIN)
        .args(["hash-key", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn a_named_config_that_does_not_exist_is_an_error() {
    for command in ["serve", "check"] {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args([command, "--config", "/nonexistent/uma.toml"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("/nonexistent/uma.toml"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn bad_config_values_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "c.toml",
        "listen = \"nowhere\"\n[tdl]\ntimezone = \"Mars/Olympus\"\n[[routes]]\nprefix = \"gpt\"\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .current_dir(manifest_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for field in ["listen", "tdl.timezone", "routes[0].prefix"] {
        assert!(
            stderr.contains(&format!(": {field}: ")),
            "{field} in {stderr}"
        );
    }
    let out = Command::new(BIN)
        .args(["check"])
        .env("UMA_REDIS_URL", "x")
        .current_dir(manifest_dir())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a single-underscore typo is an error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis_url"));
}

#[test]
fn environment_overrides_reach_the_service() {
    let service = Service::bundled_with_env(&[("UMA_TDL__TIMEZONE", "Asia/Seoul")]);
    let tdl = service
        .get("/api/tdl-matrix", &[("apikey", USER1_KEY)])
        .json();
    assert_eq!(tdl["timezone"], "Asia/Seoul");
}
