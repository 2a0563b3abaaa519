//! Test harness: the real binary (or the real server in process) on a free loopback port, and a
//! raw HTTP/1.1 client so tests control every byte (duplicate headers, unnormalized paths, a
//! `Content-Length` with no body).
#![allow(dead_code)]

pub mod admin;
pub mod echo;
pub mod money;
pub mod redis;
pub mod reload;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The twelve metadata headers of every allowed answer (SPEC §4), as the service names them.
pub const METADATA_HEADERS: [&str; 12] = [
    "X-User-TDL-Matrix",
    "X-User-Capabilities",
    "X-Consumer-ID",
    "X-User-Max-Input-Tokens",
    "X-User-Max-Output-Tokens",
    "X-User-Input-Cost",
    "X-User-Output-Cost",
    "X-User-Provider",
    "X-User-Tags",
    "X-Consumer-Username",
    "X-Consumer-Custom-ID",
    "X-Consumer-Groups",
];

/// user1-client on /midm-base/chat (the seed document's example), in `METADATA_HEADERS` order.
pub const USER1_MIDM: [&str; 12] = [
    r#"{"T1":[0,0,0,0,0,3,0,0,0,0],"T2":[0,0,0,0,0,3,0,0,0,0],"T3":[0,0,0,0,0,3,0,0,0,0],"T4":[0,0,0,0,0,3,0,0,0,0],"T5":[0,0,0,0,0,3,0,0,0,0],"T6":[0,0,0,0,0,3,0,0,0,0],"T7":[0,0,0,0,0,3,0,0,0,0],"T8":[0,0,0,0,0,3,0,0,0,0],"T9":[0,0,0,0,0,3,0,0,0,0],"T10":[0,0,0,0,0,3,0,0,0,0],"T11":[0,0,0,0,0,3,0,0,0,0],"T12":[0,0,0,0,0,3,0,0,0,0]}"#,
    "[1,1,0,0,0]",
    "kt-midm-base",
    "50000",
    "20000",
    "0.00000005",
    "0.0000002",
    "kt",
    r#"["kt","\ubbff\uc74c"]"#,
    "user1-client",
    "client-001",
    "midm-allowed",
];

pub const BIN: &str = env!("CARGO_BIN_EXE_user-metadata-auth");
pub const USER1_KEY: &str = "user1-secret-key-12345";
pub const ADMIN_KEY: &str = "admin-secret-key-67890";

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running `user-metadata-auth serve`; killed on drop.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Service {
    /// The bundled config and seed, as `cargo run --release` would serve them, on a free port.
    pub fn bundled() -> Service {
        Self::bundled_with_env(&[])
    }

    pub fn bundled_with_env(env: &[(&str, &str)]) -> Service {
        let mut command = Command::new(BIN);
        command.arg("serve").current_dir(manifest_dir());
        Self::spawn(command, env, None)
    }

    /// A config (TOML without `listen`) and seed of the test's own, written to a temp dir.
    pub fn with_files(config: &str, seed: &str) -> Service {
        Self::with_files_env(config, seed, &[])
    }

    pub fn with_files_env(config: &str, seed: &str, env: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().expect("temp dir");
        let seed_path = dir.path().join("seed.yaml");
        std::fs::write(&seed_path, seed).expect("write seed");
        let config_path = dir.path().join("config.toml");
        let text = format!(
            "listen = \"127.0.0.1:0\"\n{config}\n[seed]\npath = {:?}\n",
            seed_path.display().to_string()
        );
        std::fs::write(&config_path, text).expect("write config");
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path());
        Self::spawn(command, env, Some(dir))
    }

    /// Any command that ends up running the service (e.g. under `prlimit`), on a free port.
    pub fn spawn(
        mut command: Command,
        env: &[(&str, &str)],
        dir: Option<tempfile::TempDir>,
    ) -> Service {
        command
            .env("UMA_LISTEN", "127.0.0.1:0")
            .env("UMA_REDIS__URL", "")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening")
                    && let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|a| a.split_whitespace().next())
                {
                    let _ = tx.send(addr.parse::<SocketAddr>().ok());
                }
                sink.lock().unwrap().push(line);
            }
            let _ = tx.send(None);
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(addr)) => addr,
            _ => {
                let _ = child.kill();
                panic!(
                    "service did not start; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Service {
            child,
            addr,
            logs,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The admin listener's address as the service logged it (start it with
    /// `UMA_ADMIN__LISTEN=127.0.0.1:0`, so no other test can take the port first).
    pub fn admin_addr(&self) -> SocketAddr {
        let started = Instant::now();
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("admin API open"))
                .find_map(|l| {
                    l.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
            if let Some(addr) = found {
                return addr;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the admin listener never opened:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        request(self.addr, "GET", path, headers)
    }

    pub fn auth(&self, key: &str, uri: &str) -> Response {
        self.get("/auth", &[("apikey", key), ("X-Forwarded-Uri", uri)])
    }

    /// SIGTERM, then the exit status (None if it did not exit within `wait`).
    pub fn terminate(mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request on a fresh connection.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    raw(addr, head.as_bytes(), method == "HEAD")
}

/// Sends raw bytes and reads one answer (head, then `Content-Length` bytes of body).
pub fn raw(addr: SocketAddr, bytes: &[u8], head_only: bool) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).expect("write");
    read_response(&mut stream, head_only)
}

/// One read, retried when a signal interrupts it (EINTR, seen on a loaded shared VM for every
/// blocked read of the test process at once): only the read, so a request is never sent twice.
pub fn read_some(stream: &mut TcpStream, buffer: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buffer) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn read_response(stream: &mut TcpStream, head_only: bool) -> Response {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_some(stream, &mut chunk).expect("read answer head");
        assert!(
            n > 0,
            "connection closed before an answer: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end..].to_vec();
    if !head_only && status != 204 {
        while body.len() < length {
            let n = read_some(stream, &mut chunk).expect("read body");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A metadata entry in seed YAML, indented for `metadata_list`.
pub fn entry_yaml(id: &str, provider: &str) -> String {
    let mut out = format!(
        "            - id: \"{id}\"\n              provider_name: \"{provider}\"\n              tags: [\"{provider}\"]\n              tdl_matrix:\n"
    );
    for slot in 1..=12 {
        out.push_str(&format!("                T{slot}: [1, 2]\n"));
    }
    out.push_str(
        "              capabilities: [1, 0]\n              max_input_tokens: 100\n              max_output_tokens: 50\n              input_cost_per_token: 0.001\n              output_cost_per_token: 0.002\n",
    );
    out
}

/// `plugins: [user-metadata]` with the given entries, at the indentation of a consumer or route.
pub fn metadata_plugin(entries: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n",
    );
    for (id, provider) in entries {
        out.push_str(&entry_yaml(id, provider));
    }
    out
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Seconds until the current UTC day (the service's default `tdl.timezone`) ends.
pub fn secs_to_utc_midnight() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    86_400 - now % 86_400
}

/// A test that counts a whole day must not straddle its end: wait past midnight if it is close.
pub fn away_from_midnight() {
    let left = secs_to_utc_midnight();
    if left < 90 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}
