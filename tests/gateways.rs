//! Real gateways with the files from `deploy/`: Debian's nginx (auth_request) and Caddy
//! (forward_auth) in front of an upstream that echoes what it receives, asking the real service.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::echo::Echo;
use common::redis::free_port;
use common::*;

fn require(binary: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .output();
    assert!(
        found.map(|o| o.status.success()).unwrap_or(false),
        "`{binary}` is not installed: install Debian's {package} package (scripts/test.sh does this as root)"
    );
}

/// Replaces `from` with `to` in a deploy file, failing loudly if the file no longer has it.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "deploy file no longer contains `{from}`"
    );
    text.replace(from, to)
}

/// A deploy file copied into a fresh directory with addresses substituted.
fn deploy_copy(
    file: &str,
    substitutions: &[(&str, String)],
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(manifest_dir().join(file)).unwrap();
    for (from, to) in substitutions {
        text = substitute(&text, from, to);
    }
    let name = Path::new(file)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("config");
    let config = write_file(dir.path(), name, &text);
    (dir, config)
}

/// A running gateway process; killed on drop.
struct Gateway {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its workers, which a SIGKILL would leave running.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn wait_listening(self) -> Gateway {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.addr()).is_ok() {
                return self;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway did not listen on {}", self.port);
    }

    fn nginx(service: SocketAddr, upstream: SocketAddr) -> Gateway {
        require("nginx", "nginx");
        let port = free_port();
        let (dir, config) = deploy_copy(
            "deploy/nginx/nginx.conf",
            &[
                ("listen 8080;", format!("listen 127.0.0.1:{port};")),
                ("server 127.0.0.1:8089;", format!("server {service};")),
                ("server 127.0.0.1:9000;", format!("server {upstream};")),
            ],
        );
        // Workers run as nobody: they must reach the prefix for request-body temp files.
        set_mode(dir.path(), 0o755);
        let pid = dir.path().join("nginx.pid");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-g")
            .arg(format!("daemon off; pid {};", pid.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        Gateway {
            port,
            child,
            _dir: dir,
        }
        .wait_listening()
    }

    fn caddy(service: SocketAddr, upstream: SocketAddr) -> Gateway {
        require("caddy", "caddy");
        let port = free_port();
        let (dir, config) = deploy_copy(
            "deploy/caddy/Caddyfile",
            &[
                (":8080 {", format!(":{port} {{\n\tbind 127.0.0.1")),
                (
                    "forward_auth 127.0.0.1:8089 {",
                    format!("forward_auth {service} {{"),
                ),
                (
                    "reverse_proxy 127.0.0.1:9000",
                    format!("reverse_proxy {upstream}"),
                ),
            ],
        );
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&config)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start caddy");
        Gateway {
            port,
            child,
            _dir: dir,
        }
        .wait_listening()
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        raw(self.addr(), &bytes, false)
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What the echo upstream received.
struct Received(serde_json::Value);

impl Received {
    fn of(r: &Response) -> Received {
        assert_eq!(r.status, 200, "the call did not reach the upstream: {r:?}");
        Received(r.json())
    }

    fn headers(&self, name: &str) -> Vec<String> {
        self.0["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|h| h[1].as_str().unwrap().to_owned())
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        let all = self.headers(name);
        assert!(
            all.len() <= 1,
            "{name} reached the upstream {} times: {all:?}",
            all.len()
        );
        all.into_iter().next()
    }
}

fn connections_accepted(service: &Service) -> f64 {
    service
        .get("/metrics", &[])
        .body
        .lines()
        .find_map(|l| l.strip_prefix("uma_http_connections_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A consumer without custom_id or groups: its empty headers are where a forged copy could slip in.
fn bare_consumer_seed() -> String {
    format!(
        "consumers:\n  - username: bare\n    keyauth_credentials: [{{key: bare-key}}]\n{}",
        metadata_plugin(&[("first", "p1"), ("second", "p2")])
    )
}

type Start = fn(SocketAddr, SocketAddr) -> Gateway;
const GATEWAYS: [(&str, Start); 2] = [("nginx", Gateway::nginx), ("caddy", Gateway::caddy)];

#[test]
fn allowed_calls_reach_the_upstream_with_the_headers_and_without_the_key() {
    let service = Service::bundled();
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        let gateway = start(service.addr, echo.addr);
        let body = format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"안녕하세요 {}\"}}]}}",
            "x".repeat(70_000)
        );
        let r = gateway.call(
            "POST",
            "/midm-base/chat?stream=false",
            &[("apikey", USER1_KEY), ("Content-Type", "application/json")],
            &body,
        );
        let got = Received::of(&r);
        assert_eq!(got.0["method"], "POST", "{name}");
        assert_eq!(got.0["uri"], "/midm-base/chat?stream=false", "{name}");
        assert_eq!(
            got.0["body"],
            body.as_str(),
            "{name}: the body reaches the upstream untouched"
        );
        let expected = service.auth(USER1_KEY, "/midm-base/chat");
        for header in METADATA_HEADERS {
            assert_eq!(
                got.header(header).as_deref(),
                expected.header(header),
                "{name}: {header}"
            );
        }
        assert_eq!(
            got.header("apikey"),
            None,
            "{name}: the key is hidden from the upstream"
        );
        let r = gateway.call("GET", "/gpt4o/chat", &[("x-api-key", ADMIN_KEY)], "");
        let got = Received::of(&r);
        assert_eq!(
            got.header("X-Consumer-ID").as_deref(),
            Some("azure-gpt4o"),
            "{name}"
        );
        assert_eq!(got.header("x-api-key"), None, "{name}");
    }
}

#[test]
fn client_copies_of_the_headers_never_reach_the_upstream() {
    let service = Service::with_files("", &bare_consumer_seed());
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        let gateway = start(service.addr, echo.addr);
        let forged: Vec<(&str, &str)> = METADATA_HEADERS.iter().map(|h| (*h, "forged")).collect();
        let mut headers = vec![("apikey", "bare-key")];
        headers.extend(forged.iter().copied());
        headers.push(("X-Consumer-Custom-ID", ""));
        headers.push(("X-User-Extra", "forged"));
        let got = Received::of(&gateway.call("GET", "/any", &headers, ""));
        if name == "caddy" {
            // Caddy removes every X-User-*/X-Consumer-* header a client sent; nginx replaces the
            // twelve it sets and cannot delete by prefix (see deploy/nginx/README.md).
            assert_eq!(got.header("X-User-Extra"), None);
        }
        for header in METADATA_HEADERS {
            for value in got.headers(header) {
                assert_ne!(value, "forged", "{name}: a client's {header} got through");
            }
        }
        assert_eq!(
            got.header("X-Consumer-ID").as_deref(),
            Some("first"),
            "{name}"
        );
        assert_eq!(
            got.header("X-Consumer-Username").as_deref(),
            Some("bare"),
            "{name}"
        );
        // Empty answers (no custom_id, no groups) arrive empty or not at all, never forged.
        for header in ["X-Consumer-Custom-ID", "X-Consumer-Groups"] {
            assert!(
                got.header(header).is_none_or(|v| v.is_empty()),
                "{name}: {header}"
            );
        }
    }
}

#[test]
fn clients_cannot_choose_the_entry_or_the_uri_the_service_sees() {
    let service = Service::with_files("", &bare_consumer_seed());
    let bundled = Service::bundled();
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        let gateway = start(service.addr, echo.addr);
        let got = Received::of(&gateway.call(
            "GET",
            "/x?metadata_id=second",
            &[("apikey", "bare-key"), ("X-Metadata-Id", "second")],
            "",
        ));
        assert_eq!(
            got.header("X-Consumer-ID").as_deref(),
            Some("first"),
            "{name}"
        );
        let gateway = start(bundled.addr, echo.addr);
        let spoofed = gateway.call(
            "POST",
            "/gpt4o/chat",
            &[
                ("apikey", USER1_KEY),
                ("X-Forwarded-Uri", "/midm-base/chat"),
                ("X-Original-URI", "/midm-base/chat"),
                ("X-Forwarded-Method", "GET"),
            ],
            "{}",
        );
        assert_eq!(
            spoofed.status, 403,
            "{name}: the service must see the real URI: {spoofed:?}"
        );
    }
}

#[test]
fn denials_pass_through_with_their_headers() {
    let service = Service::bundled();
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        let gateway = start(service.addr, echo.addr);
        for (key, status) in [
            (None, 401),
            (Some("wrong-key"), 401),
            (Some(USER1_KEY), 403),
        ] {
            let headers: Vec<(&str, &str)> = key.map(|k| vec![("apikey", k)]).unwrap_or_default();
            let r = gateway.call("POST", "/gpt4o/chat", &headers, "{}");
            assert_eq!(r.status, status, "{name}: {r:?}");
            if status == 401 {
                assert_eq!(
                    r.header("www-authenticate"),
                    Some(r#"Key realm="user-metadata-auth""#),
                    "{name}"
                );
            }
            assert!(r.json()["message"].is_string(), "{name}: JSON body {r:?}");
            assert!(
                !r.body.contains("\"uri\""),
                "{name}: a denied call reached the upstream"
            );
        }
    }
}

#[test]
fn metadata_store_unavailable_comes_out_as_503_with_retry_after() {
    // Redis configured but down, and a key in no local source: the service cannot decide.
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let service = Service::bundled_with_env(&[("UMA_REDIS__URL", dead_redis.as_str())]);
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        let gateway = start(service.addr, echo.addr);
        let r = gateway.call("GET", "/midm-base/chat", &[("apikey", "only-in-redis")], "");
        assert_eq!(r.status, 503, "{name}: {r:?}");
        assert_eq!(r.header("retry-after"), Some("1"), "{name}");
        assert_eq!(r.json()["message"], "Metadata store unavailable", "{name}");
        // Seed keys are still served.
        assert_eq!(
            gateway
                .call("GET", "/midm-base/chat", &[("apikey", USER1_KEY)], "")
                .status,
            200,
            "{name}"
        );
    }
}

/// `capped` (key `capped-key`), whose only entry allows two calls a day, and `free` (key
/// `free-key`), whose entry has no limits.
fn limited_seed() -> String {
    let capped = metadata_plugin(&[("capped-entry", "p1")]).replace(
        "              input_cost_per_token:",
        "              limits: {requests_per_day: 2}\n              input_cost_per_token:",
    );
    assert!(capped.contains("requests_per_day"));
    format!(
        "consumers:\n  - username: capped\n    keyauth_credentials: [{{key: capped-key}}]\n{capped}  - username: free\n    keyauth_credentials: [{{key: free-key}}]\n{}",
        metadata_plugin(&[("free-entry", "p2")])
    )
}

/// The integer value of `key` in a one-member RateLimit field for the `day` window.
fn day_param(field: &str, key: &str) -> u64 {
    let params = field
        .strip_prefix("\"day\";")
        .unwrap_or_else(|| panic!("not a day member: {field}"));
    params
        .split(';')
        .find_map(|p| p.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {field}"))
}

#[test]
fn request_limits_reach_the_client_as_429_with_retry_after_and_the_ratelimit_fields() {
    away_from_midnight();
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        // A service of its own per gateway, so each starts with the full quota.
        let service = Service::with_files("", &limited_seed());
        let gateway = start(service.addr, echo.addr);
        for call in 1..=2u64 {
            let r = gateway.call("POST", "/v1/chat", &[("apikey", "capped-key")], "{}");
            let got = Received::of(&r);
            assert_eq!(
                got.header("X-Consumer-ID").as_deref(),
                Some("capped-entry"),
                "{name}"
            );
            // Allowed calls carry the fields to the client, once each...
            assert_eq!(r.header_count("ratelimit-policy"), 1, "{name}: {r:?}");
            assert_eq!(r.header_count("ratelimit"), 1, "{name}: {r:?}");
            assert_eq!(
                r.header("ratelimit-policy"),
                Some(r#""day";q=2;w=86400"#),
                "{name}"
            );
            let state = r.header("ratelimit").unwrap();
            assert_eq!(
                day_param(state, "r"),
                2 - call,
                "{name}: call {call}: {state}"
            );
            assert!(
                day_param(state, "t").abs_diff(secs_to_utc_midnight()) <= 2,
                "{name}: {state}"
            );
            // ...and never to the upstream.
            for header in ["RateLimit", "RateLimit-Policy", "Retry-After"] {
                assert_eq!(got.header(header), None, "{name}: {header} went upstream");
            }
        }

        let r = gateway.call("POST", "/v1/chat", &[("apikey", "capped-key")], "{}");
        assert_eq!(r.status, 429, "{name}: {r:?}");
        assert_eq!(
            r.json(),
            serde_json::json!({"message": "API rate limit exceeded"}),
            "{name}: the service's body, not the upstream's"
        );
        assert_eq!(r.header("cache-control"), Some("no-store"), "{name}");
        let retry_after = retry_after_to_midnight(&r, name);
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""day";q=2;w=86400"#),
            "{name}: {r:?}"
        );
        let state = r
            .header("ratelimit")
            .unwrap_or_else(|| panic!("{name}: no RateLimit on the 429: {r:?}"));
        assert_eq!(day_param(state, "r"), 0, "{name}: {state}");
        assert!(
            day_param(state, "t").abs_diff(retry_after) <= 1,
            "{name}: {state} vs Retry-After {retry_after}"
        );

        // An entry without limits: no RateLimit fields at all (no empty or placeholder copies).
        for _ in 0..3 {
            let r = gateway.call("POST", "/v1/chat", &[("apikey", "free-key")], "{}");
            let got = Received::of(&r);
            assert_eq!(
                got.header("X-Consumer-ID").as_deref(),
                Some("free-entry"),
                "{name}"
            );
            for header in ["ratelimit", "ratelimit-policy"] {
                assert_eq!(r.header(header), None, "{name}: {header} on {r:?}");
            }
        }
    }
}

/// The ingest token of the services below (`usage.token`, SPEC §9).
const USAGE_TOKEN: &str = "gateway-test-usage-token";

/// `spent` (key `spent-key`), whose only entry `spent-entry` has a budget of 10 tokens a day, and
/// `blocked` (key `blocked-key`), whose entry allows no call at all (a request limit of 0).
fn budget_seed() -> String {
    let limit = |entry: &str, provider: &str, limits: &str| {
        let yaml = metadata_plugin(&[(entry, provider)]).replace(
            "              input_cost_per_token:",
            &format!("              limits: {{{limits}}}\n              input_cost_per_token:"),
        );
        assert!(yaml.contains(limits));
        yaml
    };
    format!(
        "consumers:\n  - username: spent\n    keyauth_credentials: [{{key: spent-key}}]\n{}  - username: blocked\n    keyauth_credentials: [{{key: blocked-key}}]\n{}",
        limit("spent-entry", "p1", "tokens_per_day: 10"),
        limit("blocked-entry", "p2", "requests_per_day: 0")
    )
}

/// `POST /usage` to the service itself, with its token.
fn post_usage(service: &Service, body: &str) -> Response {
    let head = format!(
        "POST /usage HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {USAGE_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    raw(
        service.addr,
        &[head.as_bytes(), body.as_bytes()].concat(),
        false,
    )
}

/// The integer `key` of the member `name` in a RateLimit or RateLimit-Policy field.
fn member_param(field: &str, name: &str, key: &str) -> u64 {
    field
        .split(',')
        .map(str::trim)
        .find_map(|m| m.strip_prefix(&format!("\"{name}\";")))
        .unwrap_or_else(|| panic!("no {name} member in {field}"))
        .split(';')
        .find_map(|p| p.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the {name} member of {field}"))
}

/// Calls `call` until it answers 429, for at most `within` (then fails), and returns that 429.
fn until_refused(within: Duration, mut call: impl FnMut() -> Response) -> Response {
    let deadline = Instant::now() + within;
    loop {
        let r = call();
        if r.status == 429 || Instant::now() >= deadline {
            assert_eq!(r.status, 429, "still not refused after {within:?}: {r:?}");
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn budget_refusals_reach_the_client_as_429_usage_budget_exceeded() {
    away_from_midnight();
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        // A service of its own per gateway, so each starts with the whole budget (embedded mode:
        // a record counts at once).
        let service =
            Service::with_files_env("", &budget_seed(), &[("UMA_USAGE__TOKEN", USAGE_TOKEN)]);
        let gateway = start(service.addr, echo.addr);

        // Nothing recorded yet: allowed, the budget in the RateLimit fields.
        let r = gateway.call("POST", "/v1/chat", &[("apikey", "spent-key")], "{}");
        let got = Received::of(&r);
        assert_eq!(
            got.header("X-Consumer-ID").as_deref(),
            Some("spent-entry"),
            "{name}"
        );
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""tokens-day";q=10;w=86400"#),
            "{name}: {r:?}"
        );
        let state = r
            .header("ratelimit")
            .unwrap_or_else(|| panic!("{name}: {r:?}"));
        assert_eq!(
            member_param(state, "tokens-day", "r"),
            10,
            "{name}: {state}"
        );

        // 11 tokens recorded, posted to the service itself as a log shipper would: the budget of
        // 10 is reached.
        let answer = post_usage(
            &service,
            r#"{"request_id":"r1","consumer":"spent","metadata_id":"spent-entry","input_tokens":10,"output_tokens":1}"#,
        );
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
        let outcome = answer.json();
        assert_eq!(outcome["accepted"], 1, "{name}: {outcome}");
        assert_eq!(
            outcome["rejected"],
            serde_json::json!([]),
            "{name}: {outcome}"
        );

        // The service says which kind of limit refused the call: nginx rebuilds the body from it.
        let direct = until_refused(Duration::from_secs(2), || {
            service.auth("spent-key", "/v1/chat")
        });
        assert_eq!(
            direct.json(),
            serde_json::json!({"message": "Usage budget exceeded"}),
            "{name}: {direct:?}"
        );
        assert_eq!(
            direct.header("x-uma-limit"),
            Some("budget"),
            "{name}: {direct:?}"
        );

        // Through the gateway: the service's body, Retry-After to the end of the day and the
        // RateLimit fields, and nothing reaches the upstream.
        let r = until_refused(Duration::from_secs(2), || {
            gateway.call("POST", "/v1/chat", &[("apikey", "spent-key")], "{}")
        });
        assert_eq!(
            r.json(),
            serde_json::json!({"message": "Usage budget exceeded"}),
            "{name}: {r:?}"
        );
        assert!(!r.body.contains("\"uri\""), "{name}: reached the upstream");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{name}");
        let retry_after = retry_after_to_midnight(&r, name);
        assert_eq!(r.header_count("ratelimit-policy"), 1, "{name}: {r:?}");
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""tokens-day";q=10;w=86400"#),
            "{name}: {r:?}"
        );
        let state = r
            .header("ratelimit")
            .unwrap_or_else(|| panic!("{name}: no RateLimit on the 429: {r:?}"));
        assert_eq!(member_param(state, "tokens-day", "r"), 0, "{name}: {state}");
        assert!(
            member_param(state, "tokens-day", "t").abs_diff(retry_after) <= 1,
            "{name}: {state} vs Retry-After {retry_after}"
        );

        // A request limit's refusal keeps its own message through the same gateway.
        let direct = service.auth("blocked-key", "/v1/chat");
        assert_eq!(direct.status, 429, "{name}: {direct:?}");
        assert_eq!(
            direct.header("x-uma-limit"),
            Some("requests"),
            "{name}: {direct:?}"
        );
        let r = gateway.call("POST", "/v1/chat", &[("apikey", "blocked-key")], "{}");
        assert_eq!(r.status, 429, "{name}: {r:?}");
        assert_eq!(
            r.json(),
            serde_json::json!({"message": "API rate limit exceeded"}),
            "{name}: {r:?}"
        );
        assert!(r.header("retry-after").is_some(), "{name}: {r:?}");
    }
}

#[test]
fn nginx_fails_closed_when_the_service_is_unreachable() {
    let echo = Echo::start();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gateway = Gateway::nginx(nowhere, echo.addr);
    let r = gateway.call("GET", "/midm-base/chat", &[("apikey", USER1_KEY)], "");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(!r.body.contains("\"uri\""));
}

#[test]
fn nginx_turns_a_429_from_the_auth_service_into_a_429() {
    // A stand-in auth server whose 429 carries only Retry-After (the service's own 429 is tested
    // above): nginx still rebuilds it, and leaves out the RateLimit fields it has no value for.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let limiter = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        let body = r#"{"message":"API rate limit exceeded"}"#;
                        let answer = format!(
                            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 42\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let echo = Echo::start();
    let gateway = Gateway::nginx(limiter, echo.addr);
    let r = gateway.call("GET", "/midm-base/chat", &[("apikey", USER1_KEY)], "");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("42"));
    assert_eq!(r.json()["message"], "API rate limit exceeded");
    assert_eq!(r.header("ratelimit"), None, "{r:?}");
    assert_eq!(r.header("ratelimit-policy"), None, "{r:?}");
}

#[test]
fn connections_to_the_service_are_reused() {
    let service = Service::bundled();
    let echo = Echo::start();
    for (name, start) in GATEWAYS {
        let gateway = start(service.addr, echo.addr);
        let before = connections_accepted(&service);
        for _ in 0..60 {
            assert_eq!(
                gateway
                    .call("GET", "/midm-base/chat", &[("apikey", USER1_KEY)], "")
                    .status,
                200,
                "{name}"
            );
        }
        // Each /metrics read is a connection of its own (the raw client closes it).
        let opened = connections_accepted(&service) - before - 1.0;
        assert!(
            opened <= 4.0,
            "{name}: {opened} new connections for 60 calls"
        );
    }
}

#[test]
fn the_services_own_endpoints_are_proxied_by_nginx() {
    let service = Service::bundled();
    let echo = Echo::start();
    let gateway = Gateway::nginx(service.addr, echo.addr);
    let r = gateway.call("GET", "/api/user-metadata", &[("apikey", USER1_KEY)], "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()[0]["id"], "kt-midm-base");
    let r = gateway.call("GET", "/api/tdl-matrix", &[("apikey", USER1_KEY)], "");
    assert_eq!(r.json()["timezone"], "UTC");
}

#[test]
fn non_ascii_queries_and_paths_never_skip_the_acl() {
    // nginx and Caddy pass a client's raw bytes on; the service reads them as percent-encoded
    // (SPEC §4) instead of treating the URI as absent, which once skipped every ACL.
    let echo = Echo::start();
    for (name, start, source) in [
        ("nginx", Gateway::nginx as Start, "original"),
        ("caddy", Gateway::caddy as Start, "forwarded"),
    ] {
        for service in [
            Service::bundled(),
            Service::bundled_with_env(&[("UMA_AUTH__ORIGINAL_REQUEST", source)]),
        ] {
            let gateway = start(service.addr, echo.addr);
            for path in [
                "/gpt4o/chat?x=é",
                "/gpt4o/chat/é",
                "/gpt4o/ch%C3%A4t/../chat?q=ü",
            ] {
                let r = gateway.call("GET", path, &[("apikey", USER1_KEY)], "");
                assert_eq!(r.status, 403, "{name} ({source}) {path}: {r:?}");
            }
            let r = gateway.call("GET", "/gpt4o/chat?x=é", &[("apikey", ADMIN_KEY)], "");
            let got = Received::of(&r);
            assert_eq!(
                got.header("X-Consumer-ID").as_deref(),
                Some("azure-gpt4o"),
                "{name}"
            );
            let r = gateway.call("GET", "/midm-base/chat?x=é", &[("apikey", USER1_KEY)], "");
            let got = Received::of(&r);
            assert_eq!(
                got.header("X-Consumer-ID").as_deref(),
                Some("kt-midm-base"),
                "{name}"
            );
        }
    }
}

/// `Retry-After` of a daily limit's 429: whole seconds, about the time to UTC midnight.
fn retry_after_to_midnight(r: &Response, name: &str) -> u64 {
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: Retry-After must be an integer: {r:?}"));
    assert!(
        retry_after >= 1 && retry_after.abs_diff(secs_to_utc_midnight()) <= 2,
        "{name}: Retry-After {retry_after}"
    );
    retry_after
}
