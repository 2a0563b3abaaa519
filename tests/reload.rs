//! Seed reload (SPEC §10) with the real binary: file changes (an editor's rename, an in-place
//! write, a Kubernetes ConfigMap swap), SIGHUP with the config's routes, `POST /admin/reload`,
//! the last good seed kept through an invalid one, requests in flight across reloads, and the
//! Redis seed copies rewritten.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::reload::*;
use common::*;

/// Generous: a reload is the debounce (500 ms) plus a read of a small seed.
const RELOAD_WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "reload-test-admin-token-0123456789abcdef";

fn alice(custom_id: &str) -> String {
    consumer("alice", "alice-key-0001", custom_id, "p1")
}
fn bob() -> String {
    consumer("bob", "bob-key-0002", "c-bob", "p2")
}
fn carol() -> String {
    consumer("carol", "carol-key-0003", "c-carol", "p3")
}

/// Polls `key` on `/auth` until it answers `status`, for at most `limit`; how long it took.
fn wait_status(service: &Service, key: &str, status: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let answer = service.auth(key, "/chat");
        if answer.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{key} still answers {} after {limit:?}: {answer:?}",
            answer.status
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn post_reload(addr: SocketAddr, token: Option<&str>) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    request(addr, "POST", "/admin/reload", &headers)
}

#[test]
fn an_editor_rename_swap_reloads_and_a_removed_key_is_refused_within_a_second() {
    let redis = Redis::start();
    let mut files = Files::new();
    let url = redis.url();
    let service = files.serve(
        "",
        &seed(&[alice("c-1"), bob()]),
        &[("UMA_REDIS__URL", &url)],
    );
    wait_copies_written(&service, Duration::from_secs(10));
    // Cached before the swap: bob's answer (fresh for cache.local_ttl_ms, 5 s) and carol's refusal
    // (a Redis command past its 50 ms timeout answers 503 for a key the seed lacks: asked again).
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 200);
    wait_status(&service, "carol-key-0003", 401, Duration::from_secs(5));
    let ok = reloads(&service, "ok");

    files.swap_seed(&seed(&[alice("c-1"), carol()]));
    wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    let refused = wait_status(&service, "bob-key-0002", 401, Duration::from_secs(1));
    let admitted = wait_status(&service, "carol-key-0003", 200, Duration::from_secs(1));
    println!(
        "after the reload: removed key refused in {refused:?}, new key admitted in {admitted:?}"
    );
    let answer = service.auth("carol-key-0003", "/chat");
    assert_eq!(answer.header("x-consumer-username"), Some("carol"));
    assert_eq!(answer.header("x-consumer-id"), Some("e-carol"));
    assert_eq!(service.auth("alice-key-0001", "/chat").status, 200);
    assert_eq!(reloads(&service, "error"), 0.0, "{}", service.logs());
}

#[test]
fn a_burst_of_in_place_writes_makes_one_reload() {
    let mut files = Files::new();
    let service = files.serve("", &seed(&[alice("c-1")]), &[]);
    let (ok, errors) = (reloads(&service, "ok"), reloads(&service, "error"));

    // Truncated, then written in four pieces: a reader in the middle would see half a seed.
    files.write_seed_in_place(&seed(&[alice("c-2"), bob()]), 4, Duration::from_millis(30));
    let now = wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    assert_eq!(now, ok + 1.0);
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 200);
    assert_eq!(
        service
            .auth("alice-key-0001", "/chat")
            .header("x-consumer-custom-id"),
        Some("c-2")
    );
    // Longer than the debounce and its ticks: a second reload of the burst would have happened.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(reloads(&service, "ok"), ok + 1.0, "{}", service.logs());
    assert_eq!(reloads(&service, "error"), errors, "{}", service.logs());

    // The same bytes written again are no reload; a touch neither.
    files.write_seed_in_place(&seed(&[alice("c-2"), bob()]), 1, Duration::ZERO);
    let status = std::process::Command::new("touch")
        .arg(&files.seed)
        .status()
        .expect("touch");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(reloads(&service, "ok"), ok + 1.0, "{}", service.logs());
}

#[test]
fn an_invalid_seed_keeps_the_last_good_one_until_it_is_fixed() {
    let mut files = Files::new();
    let service = files.serve("", &seed(&[alice("c-1")]), &[]);
    let (ok, errors) = (reloads(&service, "ok"), reloads(&service, "error"));

    // Bob's matrix misses T7, and alice comes twice.
    let broken =
        seed(&[alice("c-1"), bob(), alice("c-3")]).replace("                T7: [1, 2]\n", "");
    files.swap_seed(&broken);
    wait_reloads(&service, "error", errors, RELOAD_WAIT);
    let problems = files.check_problems();
    assert!(problems.len() >= 2, "{problems:?}");
    for problem in &problems {
        wait_log(&service, problem, Duration::from_secs(5));
        let line = service
            .logs()
            .lines()
            .find(|l| l.ends_with(problem.as_str()))
            .map(str::to_owned);
        assert!(
            line.as_deref().is_some_and(|l| l.contains("ERROR")),
            "{problem:?} is not logged at error: {line:?}"
        );
    }
    // The last good seed serves: alice as she was, bob unknown.
    let answer = service.auth("alice-key-0001", "/chat");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-consumer-custom-id"), Some("c-1"));
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 401);
    assert_eq!(reloads(&service, "ok"), ok);

    files.swap_seed(&seed(&[alice("c-4"), bob()]));
    wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 200);
    assert_eq!(
        service
            .auth("alice-key-0001", "/chat")
            .header("x-consumer-custom-id"),
        Some("c-4")
    );
}

#[test]
fn a_configmap_symlink_swap_is_seen() {
    use std::os::unix::fs::symlink;
    let mut files = Files::new();
    let dir = files.dir.clone();
    std::fs::create_dir(dir.join("..2026_01_01_a")).unwrap();
    std::fs::write(dir.join("..2026_01_01_a/seed.yaml"), seed(&[alice("c-1")])).unwrap();
    symlink("..2026_01_01_a", dir.join("..data")).unwrap();
    symlink("..data/seed.yaml", &files.seed).unwrap();
    let service = files.serve_written("", &[]);
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 401);
    let ok = reloads(&service, "ok");

    // What the kubelet does: a new directory, `..data_tmp` renamed over `..data`, the old one gone.
    std::fs::create_dir(dir.join("..2026_01_02_b")).unwrap();
    std::fs::write(
        dir.join("..2026_01_02_b/seed.yaml"),
        seed(&[alice("c-1"), bob()]),
    )
    .unwrap();
    symlink("..2026_01_02_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_01_01_a")).unwrap();

    wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 200);
}

#[test]
fn sighup_reloads_the_seed_and_the_config_routes() {
    let mut files = Files::new();
    let service = files.serve("", &seed(&[alice("c-1")]), &[("UMA_SEED__WATCH", "false")]);
    assert_eq!(service.auth("alice-key-0001", "/private/x").status, 200);

    // The same seed: a SIGHUP reloads it all the same.
    let ok = reloads(&service, "ok");
    hangup(&service);
    let ok = wait_reloads(&service, "ok", ok, RELOAD_WAIT);

    // A config route refusing alice's group, and a new seed, in one SIGHUP.
    files.write_config("[[routes]]\nprefix = \"/private\"\ndeny_groups = [\"readers\"]\n");
    std::fs::write(&files.seed, seed(&[alice("c-1"), bob()])).unwrap();
    hangup(&service);
    let ok = wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    assert_eq!(service.auth("alice-key-0001", "/private/x").status, 403);
    assert_eq!(service.auth("alice-key-0001", "/public/x").status, 200);
    assert_eq!(service.auth("bob-key-0002", "/public/x").status, 200);
    assert_eq!(metric(&service, "uma_config_routes_loaded"), 1.0);
    assert!(
        !service.logs().contains("needs a restart"),
        "{}",
        service.logs()
    );

    // A setting a SIGHUP cannot apply: said so, routes still applied.
    files.write_config(
        "[cache]\nlocal_ttl_ms = 1234\n[[routes]]\nprefix = \"/private\"\ndeny_groups = [\"readers\"]\n[[routes]]\nprefix = \"/other\"\ndeny_groups = [\"readers\"]\n",
    );
    hangup(&service);
    let ok = wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    wait_log(&service, "needs a restart", Duration::from_secs(5));
    let warning = service
        .logs()
        .lines()
        .find(|l| l.contains("needs a restart"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        warning.contains("WARN") && warning.contains("config file changed in cache:"),
        "{warning}"
    );
    assert_eq!(service.auth("alice-key-0001", "/other/x").status, 403);

    // An invalid config: a failed reload, everything kept.
    let errors = reloads(&service, "error");
    files.write_config("[cache]\nlocal_ttl_ms = \"soon\"\n");
    hangup(&service);
    wait_reloads(&service, "error", errors, RELOAD_WAIT);
    assert_eq!(reloads(&service, "ok"), ok);
    assert_eq!(service.auth("alice-key-0001", "/other/x").status, 403);
    assert_eq!(service.auth("alice-key-0001", "/public/x").status, 200);
}

#[test]
fn admin_reload_answers_with_the_result() {
    let mut files = Files::new();
    let listen = "127.0.0.1:0";
    let seed_routes = "routes:\n  - name: chat\n    paths: [\"/chat\"]\n";
    let service = files.serve(
        "[[routes]]\nprefix = \"/private\"\n",
        &(seed(&[alice("c-1")]) + seed_routes),
        &[
            ("UMA_ADMIN__TOKEN", TOKEN),
            ("UMA_ADMIN__LISTEN", listen),
            ("UMA_SEED__WATCH", "false"),
        ],
    );
    let admin = service.admin_addr();
    let started_at = metric(&service, "uma_seed_loaded_timestamp_seconds");
    assert!(started_at > 1.0e9, "set at start: {started_at}");

    let refused = post_reload(admin, None);
    assert_eq!(refused.status, 401, "{refused:?}");
    let refused = post_reload(admin, Some("not-the-token-not-the-token-not-the"));
    assert_eq!(refused.status, 401, "{refused:?}");

    std::fs::write(&files.seed, seed(&[alice("c-2"), bob()]) + seed_routes).unwrap();
    let answer = post_reload(admin, Some(TOKEN));
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = answer.json();
    assert_eq!(body["result"], "ok", "{body}");
    assert_eq!(body["consumers"], 2, "{body}");
    assert_eq!(body["keys"], 2, "{body}");
    assert_eq!(body["entries"], 2, "{body}");
    assert_eq!(
        body["routes"], 2,
        "one seed route and one config route: {body}"
    );
    let loaded_at: jiff::Timestamp = body["loaded_at"]
        .as_str()
        .expect("loaded_at")
        .parse()
        .expect("RFC 3339");
    let gauge = metric(&service, "uma_seed_loaded_timestamp_seconds");
    assert!(gauge >= started_at, "{gauge} < {started_at}");
    assert!(
        (gauge - loaded_at.as_millisecond() as f64 / 1000.0).abs() < 0.01,
        "gauge {gauge} vs loaded_at {loaded_at}"
    );
    assert_eq!(service.auth("bob-key-0002", "/chat").status, 200);
    wait_log(&service, "outcome=ok", Duration::from_secs(5));

    // An invalid seed: 422 with every problem `check` finds, and the running seed kept.
    let errors = reloads(&service, "error");
    std::fs::write(
        &files.seed,
        seed(&[alice("c-3"), bob()]).replace("                T7: [1, 2]\n", ""),
    )
    .unwrap();
    let answer = post_reload(admin, Some(TOKEN));
    assert_eq!(answer.status, 422, "{answer:?}");
    let body = answer.json();
    assert_eq!(body["result"], "error", "{body}");
    assert_eq!(
        body["message"],
        "The seed is invalid; the running seed is kept"
    );
    let problems = body["problems"].as_array().expect("problems");
    let printed = files.check_problems();
    assert_eq!(problems.len(), printed.len(), "{body} vs {printed:?}");
    for (problem, line) in problems.iter().zip(&printed) {
        let file = problem["file"].as_str().expect("file");
        let field = problem["field"].as_str().expect("field");
        let reason = problem["reason"].as_str().expect("reason");
        assert_eq!(file, files.seed.display().to_string());
        assert!(
            problem["line"].is_u64() || problem["line"].is_null(),
            "{problem}"
        );
        assert!(line.starts_with(file), "{line}");
        assert!(
            line.ends_with(&format!("{field}: {reason}")),
            "{line} vs {problem}"
        );
    }
    assert_eq!(reloads(&service, "error"), errors + 1.0);
    assert_eq!(
        service
            .auth("alice-key-0001", "/chat")
            .header("x-consumer-custom-id"),
        Some("c-2")
    );
    wait_log(
        &service,
        &format!("outcome=error: {} problem(s)", printed.len()),
        Duration::from_secs(5),
    );
}

#[test]
fn requests_in_flight_during_reloads_all_succeed() {
    let redis = Redis::start();
    let mut files = Files::new();
    let listen = "127.0.0.1:0";
    let url = redis.url();
    let seeds = [seed(&[alice("c-a"), bob()]), seed(&[carol(), alice("c-b")])];
    let service = Arc::new(files.serve(
        "",
        &seeds[0],
        &[
            ("UMA_REDIS__URL", &url),
            ("UMA_ADMIN__TOKEN", TOKEN),
            ("UMA_ADMIN__LISTEN", listen),
            ("UMA_SEED__WATCH", "false"),
        ],
    ));
    let admin = service.admin_addr();
    wait_copies_written(&service, Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (service, stop) = (service.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let answer = service.auth("alice-key-0001", "/chat");
                answers.push((
                    answer.status,
                    answer.header("x-consumer-custom-id").map(str::to_owned),
                ));
            }
            answers
        })
    };
    for round in 0..20 {
        std::fs::write(&files.seed, &seeds[(round + 1) % 2]).unwrap();
        let answer = post_reload(admin, Some(TOKEN));
        assert_eq!(answer.status, 200, "reload {round}: {answer:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let answers = client.join().expect("client thread");
    println!("{} answers during 20 reloads", answers.len());
    assert!(!answers.is_empty());
    for (status, custom_id) in &answers {
        assert_eq!(*status, 200, "{answers:?}");
        assert!(
            matches!(custom_id.as_deref(), Some("c-a" | "c-b")),
            "{custom_id:?}"
        );
    }
    assert_eq!(reloads(&service, "ok"), 20.0);
}

#[test]
fn a_reload_rewrites_the_redis_copy_of_a_changed_consumer() {
    let redis = Redis::start();
    let mut files = Files::new();
    let url = redis.url();
    let service = files.serve(
        "",
        &seed(&[alice("c-1"), bob()]),
        &[
            ("UMA_REDIS__URL", &url),
            ("UMA_REDIS__CACHE_TTL_SECS", "600"),
        ],
    );
    let alice_record = "uma:consumer:{alice}";
    assert!(
        redis.wait_for(Duration::from_secs(5), |r| {
            r.cli(&["GET", alice_record]).contains("\"c-1\"")
                && r.cli(&["GET", "uma:consumer:{bob}"]).contains("\"c-bob\"")
        }),
        "the start-up copies: {}",
        redis.cli(&["GET", alice_record])
    );
    // An operator takes bob over (no TTL): a reload must leave that record alone.
    let operator = redis
        .cli(&["GET", "uma:consumer:{bob}"])
        .replace("\"c-bob\"", "\"c-operator\"");
    assert!(operator.contains("c-operator"), "{operator}");
    redis.cli(&["SET", "uma:consumer:{bob}", &operator]);

    let ok = reloads(&service, "ok");
    files.swap_seed(&seed(&[
        alice("c-2"),
        consumer("bob", "bob-key-0002", "c-bob-2", "p2"),
    ]));
    wait_reloads(&service, "ok", ok, RELOAD_WAIT);
    assert!(
        redis.wait_for(Duration::from_secs(5), |r| {
            r.cli(&["GET", alice_record]).contains("\"c-2\"")
        }),
        "the copy was not rewritten: {}",
        redis.cli(&["GET", alice_record])
    );
    let record: serde_json::Value =
        serde_json::from_str(&redis.cli(&["GET", alice_record])).expect("JSON record");
    assert_eq!(record["custom_id"], "c-2", "{record}");
    let ttl: i64 = redis.cli(&["TTL", alice_record]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 600, "ttl {ttl}");
    assert_eq!(
        redis.cli(&["TTL", "uma:consumer:{bob}"]),
        "-1",
        "the operator's record keeps no TTL"
    );
    assert!(
        redis
            .cli(&["GET", "uma:consumer:{bob}"])
            .contains("c-operator")
    );
    assert_eq!(
        service
            .auth("alice-key-0001", "/chat")
            .header("x-consumer-custom-id"),
        Some("c-2")
    );
    // The operator's record, read from Redis (the seed answers while a command times out).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = service.auth("bob-key-0002", "/chat");
        if answer.header("x-consumer-custom-id") == Some("c-operator") {
            break;
        }
        assert!(Instant::now() < deadline, "{answer:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
