//! Seed reload helpers: a service whose config and seed files the test keeps and rewrites (as an
//! editor, a script or Kubernetes would), its metrics read as numbers, small seeds.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{BIN, Service, metadata_plugin};

/// The files of one service: its directory, config and seed.
pub struct Files {
    pub dir: PathBuf,
    pub seed: PathBuf,
    pub config: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl Files {
    /// A temp directory with `seed.yaml` and `config.toml` paths (nothing written yet).
    pub fn new() -> Files {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        Files {
            seed: dir.join("seed.yaml"),
            config: dir.join("config.toml"),
            dir,
            temp: Some(temp),
        }
    }

    /// `config` (TOML without `listen` and `[seed]`) as the config file, the seed path set.
    pub fn write_config(&self, config: &str) {
        let text = format!(
            "listen = \"127.0.0.1:0\"\n{config}\n[seed]\npath = {:?}\n",
            self.seed.display().to_string()
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Writes both files and starts `serve --config` in the directory; the directory lives as long
    /// as the service.
    pub fn serve(&mut self, config: &str, seed: &str, env: &[(&str, &str)]) -> Service {
        std::fs::write(&self.seed, seed).expect("write seed");
        self.serve_written(config, env)
    }

    /// Like [`Files::serve`] with the seed already in place (a symlink, say).
    pub fn serve_written(&mut self, config: &str, env: &[(&str, &str)]) -> Service {
        self.write_config(config);
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir);
        Service::spawn(command, env, self.temp.take())
    }

    /// An editor's save: the whole text in `seed.yaml.tmp`, renamed over the seed.
    pub fn swap_seed(&self, text: &str) {
        let tmp = self.dir.join("seed.yaml.tmp");
        std::fs::write(&tmp, text).expect("write seed.yaml.tmp");
        std::fs::rename(&tmp, &self.seed).expect("rename over the seed");
    }

    /// Truncates the seed and writes `text` in `pieces` writes `gap` apart (one burst).
    pub fn write_seed_in_place(&self, text: &str, pieces: usize, gap: Duration) {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.seed)
            .expect("open the seed");
        let bytes = text.as_bytes();
        let size = bytes.len().div_ceil(pieces.max(1));
        for (i, piece) in bytes.chunks(size).enumerate() {
            if i > 0 {
                std::thread::sleep(gap);
            }
            file.write_all(piece).expect("write the seed");
            file.flush().expect("flush");
        }
    }

    /// What `check` prints for the seed as it is now: its `error: ` lines, without the prefix.
    pub fn check_problems(&self) -> Vec<String> {
        let out = Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&self.config)
            .arg("--seed")
            .arg(&self.seed)
            .current_dir(&self.dir)
            .output()
            .expect("run check");
        assert!(!out.status.success(), "check accepted the seed");
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| l.strip_prefix("error: "))
            .map(str::to_owned)
            .collect()
    }
}

/// One consumer of a test seed: `username` with `key`, group `readers`, and one metadata entry
/// `e-<username>` whose provider is `provider`.
pub fn consumer(username: &str, key: &str, custom_id: &str, provider: &str) -> String {
    format!(
        "  - username: \"{username}\"\n    custom_id: \"{custom_id}\"\n    keyauth_credentials:\n      - key: \"{key}\"\n    acls:\n      - group: \"readers\"\n{}",
        metadata_plugin(&[(&format!("e-{username}"), provider)])
    )
}

/// A seed of these consumers.
pub fn seed(consumers: &[String]) -> String {
    format!("consumers:\n{}", consumers.concat())
}

/// The value of one series on `/metrics` (`name{labels}` as Prometheus prints it); 0 when absent.
pub fn metric(service: &Service, series: &str) -> f64 {
    let body = service.get("/metrics", &[]).body;
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// `uma_seed_reloads_total{result="ok"|"error"}`.
pub fn reloads(service: &Service, result: &str) -> f64 {
    metric(
        service,
        &format!("uma_seed_reloads_total{{result=\"{result}\"}}"),
    )
}

/// Waits (up to `limit`) until the reloads with `result` exceed `before`; returns how many there
/// are then, or panics with the service's log.
pub fn wait_reloads(service: &Service, result: &str, before: f64, limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let now = reloads(service, result);
        if now > before {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no {result} reload within {limit:?} (still {now}); log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to `limit`) until the service's log contains `text`.
pub fn wait_log(service: &Service, text: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !service.logs().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the log never said {text:?}; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGHUP to the service.
pub fn hangup(service: &Service) {
    let status = Command::new("kill")
        .args(["-HUP", &service.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success(), "kill -HUP failed");
}

/// Waits (up to `limit`) until `/readyz` says the Redis seed copies are written: until then a
/// lookup may wait behind them (and a key no local source has answer 503).
pub fn wait_copies_written(service: &Service, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !service
        .get("/readyz", &[])
        .body
        .contains("\"seed_copies\":\"written\"")
    {
        assert!(
            Instant::now() < deadline,
            "seed copies never written; log:\n{}",
            service.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
