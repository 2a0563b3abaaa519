//! The deployment files (Dockerfile, docker-compose.yml, deploy/kubernetes/, deploy/prometheus/)
//! checked against the real service and real tools: `promtool` on the live `/metrics`, on the rules
//! and on the scrape config; a real Prometheus scraping a running service; and the files against each
//! other and against config/default.toml (port 8089, probes, non-root user, environment variables that
//! name real configuration keys).
//!
//! A missing tool fails the test with the Debian package to install: prometheus (prometheus and
//! promtool), redis-server and redis-tools, curl, bash.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_KEY, BIN, Service, USER1_KEY, manifest_dir};
use serde_json::{Value, json};

/// The port every deployment file gives the service.
const PORT: u16 = 8089;
/// Where the image keeps the bundled config and seed.
const IMAGE_CONFIG_DIR: &str = "/etc/user-metadata-auth";

// ---------------------------------------------------------------------------------------------
// Tools, files, the live service

/// Fails (never skips) when `binary` is not on PATH, naming the Debian package that provides it.
fn require(binary: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{binary}` is not installed: install Debian's `{package}` package (apt-get install {package})"
    );
}

fn run(command: &mut Command, stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

fn describe(output: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn repo_file(path: &str) -> PathBuf {
    manifest_dir().join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The documents of a YAML file (split on `---` lines), each as JSON; comment-only documents are
/// left out.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    let text = text.strip_prefix("---\n").unwrap_or(&text);
    text.split("\n---\n")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|doc| {
            serde_saphyr::from_str::<Value>(doc)
                .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
        })
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{path}: expected one YAML document");
    docs.remove(0)
}

/// config/default.toml as JSON, read the way the service reads it (the `config` crate).
fn default_toml() -> Value {
    config::Config::builder()
        .add_source(config::File::from(repo_file("config/default.toml")))
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .expect("config/default.toml")
}

/// `UMA_REDIS__URL` -> `redis.url`, asserted to be a key of config/default.toml.
fn assert_config_key(env_name: &str, origin: &str) {
    let path = env_name
        .strip_prefix("UMA_")
        .unwrap_or_else(|| panic!("{origin}: {env_name} lacks the UMA_ prefix"));
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let config = default_toml();
    let mut node = &config;
    for segment in &segments {
        node = node.get(segment).unwrap_or_else(|| {
            panic!(
                "{origin}: {env_name} names `{}`, which config/default.toml does not have",
                segments.join(".")
            )
        });
    }
    assert!(
        !node.is_object(),
        "{origin}: {env_name} names a table, not a key"
    );
}

/// Runs `user-metadata-auth check` the way a container would start: the deployment's environment
/// and `--config`, with the image's config directory replaced by a copy of config/.
fn assert_check_passes(env: &[(String, String)], config_path: &str, origin: &str) {
    let output = check_as_deployed(env, config_path);
    assert!(
        output.status.success(),
        "{origin}: `user-metadata-auth check` fails with this environment {env:?}:\n{}",
        describe(&output)
    );
}

/// `user-metadata-auth check` as [`assert_check_passes`] runs it, for its output.
fn check_as_deployed(env: &[(String, String)], config_path: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["default.toml", "seed.yaml"] {
        std::fs::copy(repo_file(&format!("config/{file}")), dir.path().join(file)).expect("copy");
    }
    let local = dir.path().display().to_string();
    let remap = |value: &str| value.replace(IMAGE_CONFIG_DIR, &local);
    let mut command = Command::new(BIN);
    command
        .args(["check", "--config", &remap(config_path)])
        .current_dir(dir.path());
    for (name, _) in std::env::vars() {
        if name.starts_with("UMA_") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, remap(value));
    }
    run(&mut command, None)
}

fn port_of(listen: &str) -> u16 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {listen:?}"))
}

/// A few `/auth` calls with different decisions, so counters and histograms have samples.
fn exercise(service: &Service) {
    let allowed = service.auth(USER1_KEY, "/midm-base/chat");
    assert_eq!(allowed.status, 200, "allowed call: {allowed:?}");
    let admin = service.auth(ADMIN_KEY, "/gpt4o/chat");
    assert_eq!(admin.status, 200, "admin call: {admin:?}");
    let no_key = service.get("/auth", &[("X-Forwarded-Uri", "/midm-base/chat")]);
    assert_eq!(no_key.status, 401, "call without a key: {no_key:?}");
    let invalid = service.auth("not-a-key", "/midm-base/chat");
    // 503 when Redis is configured but down: an unknown key could be one only Redis knows.
    assert!(
        matches!(invalid.status, 401 | 503),
        "call with an unknown key: {invalid:?}"
    );
    let forbidden = service.auth(USER1_KEY, "/gpt4o/chat");
    assert_eq!(forbidden.status, 403, "call outside the ACL: {forbidden:?}");
    let _ = service.get("/healthz", &[]);
}

fn live_metrics(service: &Service) -> String {
    let response = service.get("/metrics", &[]);
    assert_eq!(response.status, 200, "/metrics: {response:?}");
    response.body
}

/// Every family (`# TYPE`) and sample name in an exposition.
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_owned());
            }
        } else if !line.is_empty() && !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric names a PromQL expression selects: identifiers outside label matchers, ranges,
/// strings and grouping clauses that are neither functions, aggregations nor keywords.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let (mut braces, mut brackets) = (0usize, 0usize);
    let (mut label_list_next, mut in_label_list) = (false, false);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            '(' if label_list_next => {
                label_list_next = false;
                in_label_list = true;
            }
            ')' if in_label_list => in_label_list = false,
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric() || chars[i + 1] == '.')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric() || matches!(chars[i + 1], '_' | ':'))
                {
                    i += 1;
                }
                let word: String = chars[start..=i].iter().collect();
                let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
                if braces > 0 || brackets > 0 || in_label_list {
                    // a label name, a duration, or a grouping label
                } else if GROUPING.contains(&word.as_str()) {
                    label_list_next = next == Some(&'(');
                } else if KEYWORDS.contains(&word.as_str())
                    || AGGREGATIONS.contains(&word.as_str())
                    || next == Some(&'(')
                {
                    // an operator keyword, an aggregation or a function call
                } else {
                    names.insert(word);
                }
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The `expr` of every rule in deploy/prometheus/alerts.yml, with its alert name.
fn alert_expressions() -> Vec<(String, String)> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let groups = rules["groups"].as_array().expect("alerts.yml: groups");
    let mut out = Vec::new();
    for group in groups {
        for rule in group["rules"].as_array().expect("alerts.yml: rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("rule name")
                .to_owned();
            let expr = rule["expr"].as_str().expect("rule expr").to_owned();
            out.push((name, expr));
        }
    }
    out
}

fn curl_json(url: &str) -> Option<Value> {
    let output = run(
        Command::new("curl").args(["-sS", "--max-time", "2", url]),
        None,
    );
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// A Prometheus server; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, config: &Path) -> Prometheus {
        require("prometheus", "prometheus");
        let addr: SocketAddr = format!("127.0.0.1:{}", common::redis::free_port())
            .parse()
            .unwrap();
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr, log }
    }

    fn api(&self, path: &str) -> Option<Value> {
        curl_json(&format!("http://{}{path}", self.addr))
            .filter(|v| v["status"] == "success")
            .map(|v| v["data"].clone())
    }

    /// Polls `path` until `accept` returns something, up to `limit`.
    fn wait_for<T>(
        &mut self,
        path: &str,
        limit: Duration,
        mut accept: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(data) = self.api(path) {
                if let Some(found) = accept(&data) {
                    return found;
                }
                last = Some(data);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                panic!(
                    "Prometheus {path}: no expected answer within {limit:?}; last: {last:#?}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus: metrics, rules, config, a real server

#[test]
fn promtool_accepts_the_live_metrics() {
    require("promtool", "prometheus");
    let service = Service::bundled();
    exercise(&service);
    let body = live_metrics(&service);
    assert!(
        body.contains("uma_request_duration_seconds_bucket{endpoint=\"auth\""),
        "no /auth histogram samples:\n{body}"
    );
    let output = run(
        Command::new("promtool").args(["check", "metrics"]),
        Some(&body),
    );
    assert!(
        output.status.success(),
        "`promtool check metrics` rejects /metrics:\n{}\n--- /metrics\n{body}",
        describe(&output)
    );
}

#[test]
fn promql_metric_name_extraction() {
    let names = promql_metric_names(
        "sum by (job, instance) (rate(a_total{x=\"y\", le=~\"0.5|1\"}[5m] offset 1m)) / on(job) \
         group_left(version) b:ratio and bool c > 0.5e3 unless histogram_quantile(0.9, d_bucket)",
    );
    let expected: BTreeSet<String> = ["a_total", "b:ratio", "c", "d_bucket"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
}

#[test]
fn promtool_accepts_the_rules_and_they_read_real_series() {
    require("promtool", "prometheus");
    let output = run(
        Command::new("promtool")
            .args(["check", "rules", "deploy/prometheus/alerts.yml"])
            .current_dir(manifest_dir()),
        None,
    );
    assert!(
        output.status.success(),
        "`promtool check rules` rejects alerts.yml:\n{}",
        describe(&output)
    );
    let output = run(
        Command::new("promtool")
            .args(["test", "rules", "deploy/prometheus/alerts_test.yml"])
            .current_dir(manifest_dir()),
        None,
    );
    assert!(
        output.status.success(),
        "`promtool test rules` (alerts_test.yml) fails:\n{}",
        describe(&output)
    );

    let alerts = alert_expressions();
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "UmaDown",
        "UmaRedisDown",
        "UmaHighDenyRatio",
        "UmaTdlPendingBacklog",
        "UmaTdlDroppedIncrements",
    ] {
        assert!(names.contains(expected), "alerts.yml lacks {expected}");
    }

    let redis = common::redis::Redis::start();
    let url = redis.url();
    let service = Service::bundled_with_env(&[("UMA_REDIS__URL", &url)]);
    exercise(&service);
    // The Redis-configured service reports Redis up, so the Redis series are the live ones.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut body = live_metrics(&service);
    while !body.lines().any(|l| l == "uma_redis_up 1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        body = live_metrics(&service);
    }
    assert!(
        body.lines().any(|l| l == "uma_redis_up 1"),
        "uma_redis_up is not 1 with Redis at {url}:\n{body}"
    );
    let exposed = exposed_names(&body);
    for (alert, expr) in &alerts {
        let used = promql_metric_names(expr);
        assert!(!used.is_empty(), "{alert}: no metric found in {expr:?}");
        for name in used.iter().filter(|n| n.as_str() != "up") {
            assert!(
                exposed.contains(name),
                "{alert} reads `{name}`, which /metrics does not export; exported: {exposed:?}"
            );
        }
    }
}

#[test]
fn promtool_accepts_the_scrape_config() {
    require("promtool", "prometheus");
    let config = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(
        config["rule_files"],
        json!(["alerts.yml"]),
        "prometheus.yml: rule_files"
    );
    let jobs = config["scrape_configs"].as_array().expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == "user-metadata-auth")
        .expect("prometheus.yml: no job user-metadata-auth");
    assert_eq!(job["metrics_path"], "/metrics");
    let listen = default_toml()["listen"]
        .as_str()
        .expect("default.toml: listen")
        .to_owned();
    assert_eq!(listen, format!("127.0.0.1:{PORT}"));
    assert_eq!(
        job["static_configs"],
        json!([{ "targets": [listen] }]),
        "prometheus.yml scrapes the default listener"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(
            repo_file(&format!("deploy/prometheus/{file}")),
            dir.path().join(file),
        )
        .expect("copy");
    }
    let output = run(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")),
        None,
    );
    let text = describe(&output);
    assert!(
        output.status.success(),
        "`promtool check config` rejects prometheus.yml:\n{text}"
    );
    assert!(
        text.contains("1 rule files found"),
        "promtool did not load alerts.yml:\n{text}"
    );
}

#[test]
fn prometheus_scrapes_the_service_and_evaluates_the_alerts() {
    require("curl", "curl");
    // Redis configured but unreachable, so UmaRedisDown has something to report.
    let dead_redis = format!("redis://127.0.0.1:{}", common::redis::free_port());
    let service = Service::bundled_with_env(&[("UMA_REDIS__URL", dead_redis.as_str())]);
    exercise(&service);
    let dead = format!("127.0.0.1:{}", common::redis::free_port());

    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = yaml("deploy/prometheus/prometheus.yml");
    config["global"]["scrape_interval"] = json!("1s");
    config["global"]["evaluation_interval"] = json!("1s");
    // No Alertmanager in the test.
    config.as_object_mut().unwrap().remove("alerting");
    let job = config["scrape_configs"]
        .as_array_mut()
        .expect("scrape_configs")
        .iter_mut()
        .find(|j| j["job_name"] == "user-metadata-auth")
        .expect("no job user-metadata-auth");
    job["scrape_interval"] = json!("1s");
    job["static_configs"] = json!([{ "targets": [service.addr.to_string(), dead] }]);
    std::fs::copy(
        repo_file("deploy/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .expect("copy alerts.yml");
    // JSON is YAML.
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let mut prometheus = Prometheus::start(dir.path(), &config_path);
    let instance = service.addr.to_string();
    let value = prometheus.wait_for(
        "/api/v1/query?query=uma_consumers_loaded",
        Duration::from_secs(20),
        |data| {
            data["result"]
                .as_array()?
                .iter()
                .find(|r| r["metric"]["instance"] == instance.as_str())
                .and_then(|r| r["value"][1].as_str())
                .filter(|v| *v == "2")
                .map(str::to_owned)
        },
    );
    assert_eq!(value, "2");
    let sample = prometheus.wait_for(
        "/api/v1/query?query=uma_consumers_loaded",
        Duration::from_secs(1),
        |data| data["result"].as_array()?.first().cloned(),
    );
    assert_eq!(
        sample["metric"]["job"], "user-metadata-auth",
        "job label: {sample}"
    );

    // Every rule evaluates without error once the targets are scraped.
    let rules = prometheus.wait_for("/api/v1/rules", Duration::from_secs(10), |data| {
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    });
    assert_eq!(rules.len(), alert_expressions().len(), "rules loaded");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule failed to evaluate: {rule:#}");
    }

    // The service's Redis is configured but dead, and the dead target is down: both alerts
    // select the real series (pending: their `for` is a minute).
    prometheus.wait_for("/api/v1/alerts", Duration::from_secs(10), |data| {
        let alerts = data["alerts"].as_array()?;
        let has = |name: &str, instance: &str| {
            alerts
                .iter()
                .any(|a| a["labels"]["alertname"] == name && a["labels"]["instance"] == instance)
        };
        (has("UmaRedisDown", &instance) && has("UmaDown", &dead)).then_some(())
    });
}

// ---------------------------------------------------------------------------------------------
// Dockerfile, docker-compose.yml, Kubernetes

/// A Dockerfile instruction: keyword and its arguments (continuations joined).
struct Instruction {
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_owned(),
        });
        current.clear();
    }
    out
}

/// `KEY=VALUE` pairs of ENV instructions.
fn env_pairs(args: &str) -> Vec<(String, String)> {
    args.split_whitespace()
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("Dockerfile: ENV {args:?}: use KEY=VALUE"));
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect()
}

fn json_array(text: &str, what: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| {
        panic!("Dockerfile: {what} is not an exec-form JSON array ({e}): {text}")
    })
}

/// The runtime stage's ENV pairs and CMD.
fn image_env_and_cmd() -> (Vec<(String, String)>, Vec<String>) {
    let instructions = dockerfile();
    let runtime_start = instructions
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("FROM");
    let runtime = &instructions[runtime_start..];
    let env = runtime
        .iter()
        .filter(|i| i.keyword == "ENV")
        .flat_map(|i| env_pairs(&i.args))
        .collect();
    let cmd = runtime
        .iter()
        .rfind(|i| i.keyword == "CMD")
        .map(|i| json_array(&i.args, "CMD"))
        .expect("Dockerfile: CMD");
    (env, cmd)
}

#[test]
fn dockerfile_builds_a_non_root_image_serving_on_8089() {
    require("bash", "bash");
    let instructions = dockerfile();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(stages.len(), 2, "Dockerfile: a builder and a runtime stage");
    let builder = &instructions[stages[0]..stages[1]];
    let runtime = &instructions[stages[1]..];
    assert!(
        builder[0].args.starts_with("rust:1-bookworm"),
        "builder image"
    );
    assert!(
        builder
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("cargo build --release --locked")),
        "builder runs cargo build --release --locked"
    );
    assert_eq!(runtime[0].args, "debian:bookworm-slim", "runtime image");
    let find = |keyword: &'static str| runtime.iter().filter(move |i| i.keyword == keyword);

    let installs = find("RUN")
        .find(|i| i.args.contains("apt-get install"))
        .expect("runtime installs packages");
    for package in ["ca-certificates", "tzdata"] {
        assert!(installs.args.contains(package), "runtime lacks {package}");
    }
    assert!(
        find("RUN").any(|i| i.args.contains("useradd") && i.args.contains("--uid 10001")),
        "a user with uid 10001"
    );
    let user = find("USER")
        .next_back()
        .expect("Dockerfile sets USER")
        .args
        .clone();
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user}: numeric, so runAsNonRoot can verify it"));
    assert_eq!(uid, 10001, "non-root USER");

    let copies: Vec<&str> = find("COPY").map(|i| i.args.as_str()).collect();
    assert!(
        copies.contains(
            &"--from=builder /usr/local/bin/user-metadata-auth /usr/local/bin/user-metadata-auth"
        ),
        "binary copied to /usr/local/bin: {copies:?}"
    );
    assert!(
        copies.contains(&format!("config/ {IMAGE_CONFIG_DIR}/").as_str()),
        "config/ copied to {IMAGE_CONFIG_DIR}/: {copies:?}"
    );

    let env: Vec<(String, String)> = find("ENV").flat_map(|i| env_pairs(&i.args)).collect();
    for (name, _) in &env {
        assert_config_key(name, "Dockerfile");
    }
    let value = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("Dockerfile: no ENV {name}"))
    };
    assert_eq!(value("UMA_LISTEN"), format!("0.0.0.0:{PORT}"));
    assert_eq!(
        value("UMA_SEED__PATH"),
        format!("{IMAGE_CONFIG_DIR}/seed.yaml")
    );
    let exposed: Vec<&str> = find("EXPOSE").map(|i| i.args.as_str()).collect();
    assert_eq!(exposed, [PORT.to_string()], "EXPOSE");

    let entrypoint = json_array(
        &find("ENTRYPOINT").next_back().expect("ENTRYPOINT").args,
        "ENTRYPOINT",
    );
    assert_eq!(entrypoint, ["user-metadata-auth"]);
    let cmd = json_array(&find("CMD").next_back().expect("CMD").args, "CMD");
    assert_eq!(
        cmd,
        [
            "serve",
            "--config",
            &format!("{IMAGE_CONFIG_DIR}/default.toml")
        ]
    );
    // The image's environment and command accept the bundled config and seed.
    assert_check_passes(&env, &cmd[2], "Dockerfile");

    // The health check works against a running service, and fails when nothing answers.
    let healthcheck = find("HEALTHCHECK").next_back().expect("HEALTHCHECK");
    let exec = healthcheck
        .args
        .split_once("CMD ")
        .map(|(_, exec)| json_array(exec, "HEALTHCHECK CMD"))
        .expect("HEALTHCHECK CMD [...]");
    let service = Service::bundled();
    let probe = |listen: &str| {
        run(
            Command::new(&exec[0])
                .args(&exec[1..])
                .env("UMA_LISTEN", listen),
            None,
        )
    };
    let healthy = probe(&format!("0.0.0.0:{}", service.addr.port()));
    assert!(
        healthy.status.success(),
        "HEALTHCHECK fails against a running service:\n{}",
        describe(&healthy)
    );
    let down = probe(&format!("0.0.0.0:{}", common::redis::free_port()));
    assert!(
        !down.status.success(),
        "HEALTHCHECK passes with nothing listening"
    );

    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_owned())
        .collect();
    assert!(
        ignored.iter().any(|l| l == "target"),
        ".dockerignore excludes target/"
    );
}

/// A compose `environment:` as pairs (map or `KEY=VALUE` list).
fn compose_env(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                (k.clone(), v)
            })
            .collect(),
        Value::Array(list) => list
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|s| s.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        _ => Vec::new(),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_file_wires_redis_the_service_and_nginx() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    assert_eq!(services["redis"]["image"], "redis:7-alpine");

    let uma = &services["uma"];
    assert_eq!(uma["build"], ".", "uma is built from ./Dockerfile");
    let env = compose_env(uma);
    for (name, _) in &env {
        assert_config_key(name, "docker-compose.yml");
    }
    let get = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("docker-compose.yml: uma has no {name}"))
    };
    assert_eq!(get("UMA_LISTEN"), format!("0.0.0.0:{PORT}"));
    assert_eq!(get("UMA_REDIS__URL"), "redis://redis:6379");
    assert!(
        services.get("redis").is_some(),
        "UMA_REDIS__URL names the redis service"
    );
    // The image's own environment and command, with compose's environment on top.
    let (mut image_env, cmd) = image_env_and_cmd();
    image_env.extend(env);
    assert_check_passes(&image_env, &cmd[2], "docker-compose.yml");

    // nginx shares uma's network namespace: nginx.conf's 127.0.0.1:8089 is the service, and the
    // port nginx listens on is published on uma.
    let nginx = &services["nginx"];
    assert_eq!(nginx["image"], "nginx:1.27");
    assert_eq!(nginx["network_mode"], "service:uma");
    assert_eq!(
        strings(&nginx["volumes"]),
        ["./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro"]
    );
    let conf = nginx_conf();
    assert_eq!(conf.auth_upstream, format!("127.0.0.1:{PORT}"));
    let published = strings(&uma["ports"]);
    assert!(
        published.contains(&format!("{0}:{0}", conf.listen)),
        "uma publishes nginx's port {}: {published:?}",
        conf.listen
    );
    assert!(
        published.contains(&format!("127.0.0.1:{PORT}:{PORT}")),
        "uma publishes {PORT} on the host's loopback (prometheus.yml's target): {published:?}"
    );
}

/// What deploy/nginx/nginx.conf (another file's owner) says about where it runs.
struct NginxConf {
    /// The `server` of `upstream user_metadata_auth`.
    auth_upstream: String,
    /// The port of the first `listen`.
    listen: u16,
}

fn nginx_conf() -> NginxConf {
    let text = read("deploy/nginx/nginx.conf");
    let block = text
        .split("upstream user_metadata_auth")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("deploy/nginx/nginx.conf: no `upstream user_metadata_auth` block");
    let auth_upstream = block
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("server "))
        .map(|s| {
            s.trim_end_matches(';')
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .expect("deploy/nginx/nginx.conf: no server in upstream user_metadata_auth");
    let listen = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("listen "))
        .map(|l| {
            port_of(
                l.trim_end_matches(';')
                    .split_whitespace()
                    .next()
                    .unwrap_or(""),
            )
        })
        .expect("deploy/nginx/nginx.conf: no listen");
    NginxConf {
        auth_upstream,
        listen,
    }
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("deployment.yaml: no container {name}"))
}

#[test]
fn kubernetes_manifests_agree_with_the_image_and_config() {
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(deployment["kind"], "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &deployment["spec"]["selector"]["matchLabels"], labels,
        "selector matches the pod labels"
    );
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"], true,
        "pod runAsNonRoot"
    );
    assert_eq!(
        pod["containers"].as_array().map(Vec::len),
        Some(2),
        "a gateway and the sidecar"
    );

    let uma = container(pod, "user-metadata-auth");
    let security = &uma["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 10001, "the image's uid");
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert!(uma["resources"]["requests"].is_object(), "resources");
    assert!(uma["resources"]["limits"].is_object(), "resources");

    let ports = uma["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], PORT);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &uma[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], PORT, "{probe}");
    }

    let env: Vec<(String, String)> = uma["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            // A secret (the usage token) comes from an optional Secret, never a literal.
            let value = match e["valueFrom"]["secretKeyRef"]["optional"].as_bool() {
                Some(true) => String::new(),
                _ => e["value"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: a literal value or an optional Secret"))
                    .to_owned(),
            };
            (name, value)
        })
        .collect();
    for (name, _) in &env {
        assert_config_key(name, "deployment.yaml");
    }
    let listen = &env
        .iter()
        .find(|(k, _)| k == "UMA_LISTEN")
        .expect("UMA_LISTEN")
        .1;
    // Probes and scrapes reach the pod IP, so the sidecar cannot listen on the loopback only.
    assert_eq!(listen, &format!("0.0.0.0:{PORT}"));
    let args = strings(&uma["args"]);
    assert_eq!(
        args,
        [
            "serve",
            "--config",
            &format!("{IMAGE_CONFIG_DIR}/default.toml")
        ],
        "the image's CMD"
    );
    assert_check_passes(&env, &args[2], "deployment.yaml");

    // Service links off (a Service named `uma` would inject UMA_PORT, UMA_SERVICE_HOST, ...), and
    // the service starts even where they are on: SPEC §2 has it ignore them.
    assert_eq!(
        pod["enableServiceLinks"], false,
        "deployment.yaml: enableServiceLinks: false"
    );
    let mut with_links = env.clone();
    for (name, value) in [
        ("UMA_SERVICE_HOST", "10.96.0.12"),
        ("UMA_SERVICE_PORT", "8089"),
        ("UMA_SERVICE_PORT_UMA", "8089"),
        ("UMA_PORT", "tcp://10.96.0.12:8089"),
        ("UMA_PORT_8089_TCP", "tcp://10.96.0.12:8089"),
        ("UMA_PORT_8089_TCP_PROTO", "tcp"),
        ("UMA_PORT_8089_TCP_PORT", "8089"),
        ("UMA_PORT_8089_TCP_ADDR", "10.96.0.12"),
    ] {
        with_links.push((name.to_owned(), value.to_owned()));
    }
    assert_check_passes(&with_links, &args[2], "deployment.yaml with service links");

    // The admin API: its token file is the `token` key of the optional Secret uma-admin, mounted
    // read-only into this container only, so the pod starts without the Secret (the check above
    // ran without the file: admin closed) and the token never reaches the gateway container. The
    // listener stays on the loopback; no Service port leads to it (checked below).
    let env_value = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("deployment.yaml: {name} is not set"))
    };
    let admin_listen = env_value("UMA_ADMIN__LISTEN");
    assert!(
        admin_listen.starts_with("127.0.0.1:"),
        "the admin API on the pod's loopback only: {admin_listen}"
    );
    assert!(
        ports
            .iter()
            .all(|p| p["containerPort"] != port_of(&admin_listen)),
        "no container port for the admin API"
    );
    let token_file = env_value("UMA_ADMIN__TOKEN_FILE");
    let (admin_dir, token_name) = token_file
        .rsplit_once('/')
        .expect("UMA_ADMIN__TOKEN_FILE is a path");
    let admin_mount = uma["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == admin_dir)
        .unwrap_or_else(|| panic!("nothing mounted at {admin_dir}, where the admin token file is"));
    assert_eq!(
        admin_mount["readOnly"], true,
        "the admin Secret is mounted read-only"
    );
    assert!(
        admin_mount.get("subPath").is_none(),
        "a directory mount, so a rotated Secret reaches the pod"
    );
    let admin_volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == admin_mount["name"])
        .expect("the admin token's volume");
    let secret = &admin_volume["secret"];
    assert_eq!(secret["secretName"], "uma-admin");
    assert_eq!(
        secret["optional"], true,
        "the Deployment starts without the admin Secret"
    );
    assert!(
        secret["items"].as_array().is_some_and(|items| items
            .iter()
            .any(|i| i["key"] == "token" && i["path"] == token_name)),
        "the Secret's `token` key is the file {token_file}: {secret}"
    );
    assert!(
        container(pod, "gateway")["volumeMounts"]
            .as_array()
            .expect("gateway volumeMounts")
            .iter()
            .all(|m| m["name"] != admin_mount["name"]),
        "the gateway container does not mount the admin token"
    );
    // With the Secret there, the file is read: a valid token passes, a short one is refused.
    let secrets = tempfile::tempdir().expect("temp dir");
    let file = secrets.path().join(token_name);
    let with_file: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "UMA_ADMIN__TOKEN_FILE" => (k.clone(), file.display().to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    std::fs::write(&file, "ops 0123456789abcdef0123456789abcdef\n").expect("write");
    assert_check_passes(
        &with_file,
        &args[2],
        "deployment.yaml with the admin Secret",
    );
    std::fs::write(&file, "too-short\n").expect("write");
    let refused = check_as_deployed(&with_file, &args[2]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !refused.status.success() && said.contains("admin.token_file"),
        "a short token in the Secret's file is refused:\n{}",
        describe(&refused)
    );

    // The config directory is the uma-config ConfigMap of configmap.yaml.
    let mount = uma["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == IMAGE_CONFIG_DIR)
        .expect("config mounted at /etc/user-metadata-auth");
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], "uma-config");
    let configmap = read("deploy/kubernetes/configmap.yaml");
    assert!(
        configmap.contains("kubectl create configmap uma-config --from-file=config/"),
        "configmap.yaml tells how to create uma-config"
    );
    for file in ["default.toml", "seed.yaml"] {
        assert!(repo_file(&format!("config/{file}")).exists());
    }

    // The gateway runs deploy/nginx/nginx.conf: its auth upstream is the pod's loopback, where the
    // sidecar listens, and its listener is the gateway's container port.
    let conf = nginx_conf();
    assert_eq!(conf.auth_upstream, format!("127.0.0.1:{PORT}"));
    let gateway = container(pod, "gateway");
    assert_eq!(gateway["securityContext"]["runAsNonRoot"], true);
    assert_eq!(gateway["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(gateway["ports"][0]["containerPort"], conf.listen);
    assert!(
        gateway["volumeMounts"]
            .as_array()
            .expect("gateway volumeMounts")
            .iter()
            .any(|m| m["mountPath"] == "/etc/nginx/nginx.conf"),
        "the gateway mounts nginx.conf"
    );
    assert!(
        configmap.contains("--from-file=nginx.conf=deploy/nginx/nginx.conf"),
        "configmap.yaml tells how to create gateway-nginx"
    );
    let gateway_port = gateway["ports"][0]["name"].clone();

    // The Service exposes the gateway, not the auth service.
    let service = yaml("deploy/kubernetes/service.yaml");
    assert_eq!(service["spec"]["selector"], *labels);
    for port in service["spec"]["ports"].as_array().expect("ports") {
        assert_eq!(
            port["targetPort"], gateway_port,
            "Service targets the gateway"
        );
        assert_ne!(port["targetPort"], PORT);
    }

    // Prometheus Operator scrapes the sidecar's port, under the job the alerts expect.
    let monitor = yaml("deploy/kubernetes/podmonitor.yaml");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], *labels);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        endpoint["port"], ports[0]["name"],
        "the sidecar's {PORT} port"
    );
    assert_eq!(endpoint["path"], "/metrics");
    assert!(
        endpoint["relabelings"]
            .as_array()
            .expect("relabelings")
            .iter()
            .any(|r| r["targetLabel"] == "job" && r["replacement"] == "user-metadata-auth"),
        "job=user-metadata-auth"
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/litellm/: the "own callback" example, run against the real service

#[test]
fn the_usage_curl_example_is_accepted_once_and_then_a_duplicate() {
    require("curl", "curl");
    require("bash", "bash");
    let readme = read("deploy/litellm/README.md");
    let example = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("curl") && block.contains("/usage"))
        .expect("deploy/litellm/README.md: a ```sh block posting to /usage with curl");
    let token = "readme-example-usage-token";
    // The bundled seed, which has the example's consumer and entry (user1-client, kt-midm-base).
    let service = Service::bundled_with_env(&[("UMA_USAGE__TOKEN", token)]);
    let default_address = format!("http://127.0.0.1:{PORT}");
    assert!(
        example.contains(&default_address),
        "the example posts to the service's default address {default_address}"
    );
    let command = example.replace(&default_address, &format!("http://{}", service.addr));
    let post = || -> Value {
        let output = run(
            Command::new("bash")
                .arg("-c")
                .arg(&command)
                .env("USER_METADATA_AUTH_USAGE_TOKEN", token),
            None,
        );
        assert!(output.status.success(), "{}", describe(&output));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&output)))
    };
    let first = post();
    assert_eq!(
        first,
        json!({"accepted": 1, "duplicates": 0, "rejected": []})
    );
    assert!(
        readme.contains(r#"{"accepted":1,"duplicates":0,"rejected":[]}"#),
        "README shows the answer"
    );
    // The same record again (a retry): counted once.
    let second = post();
    assert_eq!(
        second,
        json!({"accepted": 0, "duplicates": 1, "rejected": []})
    );
}
