//! Configuration checks through the real binary (SPEC §2): every numeric setting has a range that
//! `check` and `serve` enforce with the same message; Kubernetes service-link variables are ignored
//! while other unknown `UMA_` variables are errors naming the variable; README lists every range.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Service, USER1_KEY, manifest_dir};
use user_metadata_auth::config::bounds;

/// The binary without any `UMA_` variable of the test's environment.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("UMA_")
        {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// An embedded-mode config with the bundled seed, listening on a free port.
fn config_file(dir: &Path) -> PathBuf {
    let path = dir.join("uma.toml");
    let seed = manifest_dir().join("config/seed.yaml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n[redis]\nurl = \"\"\n[seed]\npath = {:?}\n",
            seed.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// Runs `sub --config FILE` with `env`; fails the test if it still runs after 2 s.
fn run(sub: &str, config: &Path, env: &[(&OsStr, &OsStr)]) -> Output {
    let start = Instant::now();
    let mut child = command()
        .arg(sub)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(2) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("`{sub}` still running after 2 s\n{}", show(&out));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn errors(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error: "))
        .map(str::to_owned)
        .collect()
}

fn str_env<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(&'a OsStr, &'a OsStr)> {
    pairs
        .iter()
        .map(|(k, v)| (OsStr::new(*k), OsStr::new(*v)))
        .collect()
}

/// `check` and `serve` both exit 1 (serve within 2 s, before listening) printing exactly
/// `expected`.
fn assert_check_and_serve_refuse(env: &[(&OsStr, &OsStr)], expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    for sub in ["check", "serve"] {
        let out = run(sub, &config, env);
        assert_eq!(out.status.code(), Some(1), "{sub}: {}", show(&out));
        assert_eq!(errors(&out), expected, "{sub}: {}", show(&out));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("listening"),
            "{sub}: {}",
            show(&out)
        );
    }
}

#[test]
fn out_of_range_values_from_the_environment_stop_check_and_serve_alike() {
    // The values of review D9: a panic inside /auth, a panic at start, an abort, an overflow.
    let env = str_env(&[
        ("UMA_TDL__RETENTION_DAYS", "100000000"),
        ("UMA_CACHE__STALE_TTL_SECS", "100000000000"),
        ("UMA_SERVER__WORKERS", "100000"),
        ("UMA_REDIS__COMMAND_TIMEOUT_MS", "18446744073709551615"),
        ("UMA_SERVER__HEADER_READ_TIMEOUT_MS", "0"),
    ]);
    assert_check_and_serve_refuse(
        &env,
        &[
            "error: environment variable UMA_REDIS__COMMAND_TIMEOUT_MS: redis.command_timeout_ms: \
             must be between 1 and 3600000 (1 hour); got 18446744073709551615",
            "error: environment variable UMA_TDL__RETENTION_DAYS: tdl.retention_days: \
             must be between 1 and 3650 (10 years); got 100000000",
            "error: environment variable UMA_CACHE__STALE_TTL_SECS: cache.stale_ttl_secs: \
             must be between 0 and 31536000 (1 year); got 100000000000",
            "error: environment variable UMA_SERVER__WORKERS: server.workers: \
             must be between 0 and 1024; got 100000",
            "error: environment variable UMA_SERVER__HEADER_READ_TIMEOUT_MS: \
             server.header_read_timeout_ms: must be between 1 and 3600000 (1 hour); got 0",
        ],
    );
}

#[test]
fn the_highest_values_in_range_start_the_service() {
    let max = |bound: user_metadata_auth::config::Bound| bound.max.to_string();
    let values = [
        ("UMA_TDL__RETENTION_DAYS", max(bounds::TDL_RETENTION_DAYS)),
        (
            "UMA_CACHE__STALE_TTL_SECS",
            max(bounds::CACHE_STALE_TTL_SECS),
        ),
        ("UMA_CACHE__LOCAL_TTL_MS", max(bounds::CACHE_LOCAL_TTL_MS)),
        (
            "UMA_REDIS__COMMAND_TIMEOUT_MS",
            max(bounds::REDIS_COMMAND_TIMEOUT_MS),
        ),
    ];
    let env: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let service = Service::bundled_with_env(&env);
    // An allowed call counts and prunes with `retention_days` (where 100000000 panicked).
    let allowed = service.auth(USER1_KEY, "/midm-base/chat");
    assert_eq!(allowed.status, 200, "{}", service.logs());
    assert!(!service.logs().contains("panicked"), "{}", service.logs());
}

#[test]
fn kubernetes_service_links_are_ignored_by_check_and_serve() {
    let links = [
        ("UMA_PORT", "tcp://10.0.0.1:8089"),
        ("UMA_SERVICE_HOST", "10.0.0.1"),
        ("UMA_SERVICE_PORT", "8089"),
        ("UMA_SERVICE_PORT_HTTP", "8089"),
        ("UMA_PORT_8089_TCP", "tcp://10.0.0.1:8089"),
        ("UMA_PORT_8089_TCP_PROTO", "tcp"),
        ("UMA_PORT_8089_TCP_PORT", "8089"),
        ("UMA_PORT_8089_TCP_ADDR", "10.0.0.1"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = run("check", &config_file(dir.path()), &str_env(&links));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: "),
        "{}",
        show(&out)
    );
    let service = Service::bundled_with_env(&links);
    assert_eq!(service.get("/healthz", &[]).status, 200);
}

#[test]
fn a_misspelled_variable_is_an_error_naming_the_environment() {
    // One underscore: `redis_url`, not `redis.url`. Next to service links, it is still refused.
    let env = str_env(&[
        ("UMA_REDIS_URL", "x"),
        ("UMA_SERVICE_HOST", "10.0.0.1"),
        ("UMA_PORT", "tcp://10.0.0.1:8089"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    for sub in ["check", "serve"] {
        let out = run(sub, &config, &env);
        assert_eq!(out.status.code(), Some(1), "{sub}: {}", show(&out));
        let errors = errors(&out);
        assert_eq!(errors.len(), 1, "{sub}: {}", show(&out));
        assert!(
            errors[0].starts_with(
                "error: environment variable UMA_REDIS_URL: redis_url: unknown field `redis_url`"
            ),
            "{sub}: {}",
            show(&out)
        );
    }
}

#[test]
fn problems_in_the_file_and_the_environment_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[redis]\npool_size = 0\n[cache]\nmax_entries = \"all\"\n",
    )
    .unwrap();
    let env = str_env(&[("UMA_TDL__MODE", "sometimes")]);
    let out = run("check", &config, &env);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let label = config.display().to_string();
    let errors = errors(&out);
    // The type errors of both sources, each naming its source (the range of pool_size is checked
    // once they are fixed).
    assert!(
        errors[0].starts_with(&format!("error: {label}: cache.max_entries: invalid type")),
        "{}",
        show(&out)
    );
    assert!(
        errors[1].starts_with("error: environment variable UMA_TDL__MODE: tdl.mode: "),
        "{}",
        show(&out)
    );
    assert_eq!(errors.len(), 2, "{}", show(&out));
}

#[test]
fn a_variable_that_is_not_utf8_is_an_error_naming_it() {
    let value = OsStr::from_bytes(b"127.0.0.1:\xff");
    let out = run(
        "check",
        &config_file(tempfile::tempdir().unwrap().path()),
        &[(OsStr::new("UMA_LISTEN"), value)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        errors(&out),
        ["error: environment variable UMA_LISTEN: listen: the value is not valid UTF-8"]
    );
}

/// README's range table: one row per numeric setting, `| `path` | min–max | `default` | … |`, the
/// default as config/default.toml has it.
#[test]
fn the_readme_lists_every_range() {
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let defaults = config::Config::builder()
        .add_source(config::File::from(
            manifest_dir().join("config/default.toml"),
        ))
        .build()
        .unwrap();
    for bound in bounds::ALL {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", bound.path)) && l.contains('–'))
            .unwrap_or_else(|| panic!("README: no range row for {}", bound.path));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[2],
            format!("{}–{}", bound.min, bound.max),
            "README range of {}",
            bound.path
        );
        let default = defaults.get::<u64>(bound.path).unwrap();
        assert_eq!(
            cells[3],
            format!("`{default}`"),
            "README default of {}",
            bound.path
        );
    }
}
