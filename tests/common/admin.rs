//! Admin API harness (SPEC §10): services with the admin listener on a port of their own, an admin
//! client (method, path, bearer token, JSON body, optionally from another loopback address so the
//! per-address throttle can be exercised), N replicas on one real `redis-server`, and looks into
//! Redis (every key with its type, TTL and content; the pub/sub clients of one process).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::redis::{Redis, free_port};
use super::{Response, Service, read_response};

/// The `admin.token` of every service started here (audit actor `admin`).
pub const TOKEN: &str = "admin-token-0123456789abcdef-0123456789";
/// The answer to a key that is unknown, expired, disabled or revoked (SPEC §4, §10).
pub const INVALID_KEY: &str = "Invalid authentication credentials";

/// A TDL matrix with every slot, as JSON.
pub fn tdl() -> Value {
    let mut matrix = serde_json::Map::new();
    for slot in 1..=12 {
        matrix.insert(format!("T{slot}"), json!([1, 2]));
    }
    Value::Object(matrix)
}

/// A valid metadata entry as the admin API takes it (the seed's shape, SPEC §3).
pub fn entry(id: &str, provider: &str) -> Value {
    json!({
        "id": id,
        "provider_name": provider,
        "tags": [provider],
        "tdl_matrix": tdl(),
        "capabilities": [1, 0],
        "max_input_tokens": 100,
        "max_output_tokens": 50,
        "input_cost_per_token": 0.001,
        "output_cost_per_token": 0.002
    })
}

/// A consumer body with one entry and the given ACL groups.
pub fn consumer_body(custom_id: &str, provider: &str, groups: &[&str]) -> Value {
    json!({
        "custom_id": custom_id,
        "tags": ["t-op"],
        "acls": groups.iter().map(|g| json!({"group": g})).collect::<Vec<_>>(),
        "metadata_list": [entry("e-op", provider)]
    })
}

/// Lower-case hex SHA-256 of a key: its stored form (SPEC §3).
pub fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id the admin API gives a seed key: `seed-<first 16 hex chars of its SHA-256>`.
pub fn seed_key_id(key: &str) -> String {
    format!("seed-{}", &sha256_hex(key)[..16])
}

/// `uma:key:<sha256 hex>`.
pub fn key_record(key: &str) -> String {
    format!("uma:key:{}", sha256_hex(key))
}

/// RFC 3339 (whole seconds, UTC) of now plus `secs` (may be negative), and that instant.
pub fn rfc3339_in(secs: i64) -> (String, jiff::Timestamp) {
    let now = jiff::Timestamp::now().as_second();
    let at = jiff::Timestamp::from_second(now + secs).expect("timestamp");
    (at.to_string(), at)
}

pub fn parse_time(value: &Value) -> jiff::Timestamp {
    value
        .as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {value}"))
}

/// Sleeps until `at` (wall clock) has passed.
pub fn sleep_until(at: jiff::Timestamp) {
    let left = at.as_millisecond() - jiff::Timestamp::now().as_millisecond();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(left as u64));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A TCP connection to `to` from the loopback address `source` (the whole 127/8 is local on
/// Linux), so a test can be several clients to the per-address throttle.
pub fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only: {to}")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned here; it is handed to `TcpStream` once
    // connected (which then closes it) and closed here on every failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let local = sockaddr(source, 0);
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("bind {source}: {e}");
        }
        let remote = sockaddr(*to.ip(), to.port());
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("connect {to} from {source}: {e}");
        }
        TcpStream::from_raw_fd(fd)
    }
}

/// One admin request on a fresh connection: `authorization` is the whole header value (None: no
/// header), `body` is sent as `application/json` with its `Content-Length`.
pub fn admin_request(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&[u8]>,
) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(value) = authorization {
        head.push_str(&format!("Authorization: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    } else if matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    let mut stream = match source {
        Some(source) => connect_from(source, addr),
        None => TcpStream::connect(addr).expect("connect to the admin listener"),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&bytes).expect("write");
    read_response(&mut stream, method == "HEAD")
}

/// The `{"message":…}` of an answer.
pub fn message(response: &Response) -> String {
    response.json()["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {response:?}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Services

/// A running service with its admin listener (`admin.listen` on a port of its own).
pub struct Node {
    pub service: Service,
    pub admin: SocketAddr,
    pub token: String,
}

impl std::ops::Deref for Node {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

/// How a node is started.
#[derive(Clone, Default)]
pub struct NodeOptions {
    /// `admin.token`; `None`: [`TOKEN`]. `Some("")`: no token (listener closed).
    pub token: Option<String>,
    /// Extra config TOML (without `listen` and `[seed]`).
    pub config: String,
    pub env: Vec<(String, String)>,
}

impl Node {
    /// A service on `redis` (embedded mode when `None`) serving `seed`, with [`TOKEN`], ready and
    /// connected to Redis, its admin listener accepting.
    pub fn start(redis: Option<&Redis>, seed: &str) -> Node {
        Self::start_with(redis, seed, &NodeOptions::default())
    }

    pub fn start_with(redis: Option<&Redis>, seed: &str, options: &NodeOptions) -> Node {
        let token = options.token.clone().unwrap_or_else(|| TOKEN.to_owned());
        // Port 0 when the listener opens (its address is read from the log, so no other test can
        // take it first); a free port otherwise, to show nothing listens there.
        let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let url = redis.map(Redis::url).unwrap_or_default();
        let listen = if token.is_empty() {
            closed.to_string()
        } else {
            "127.0.0.1:0".to_owned()
        };
        let mut env: Vec<(&str, &str)> = vec![
            ("UMA_REDIS__URL", url.as_str()),
            ("UMA_ADMIN__LISTEN", listen.as_str()),
            ("UMA_ADMIN__TOKEN", token.as_str()),
        ];
        if redis.is_some() {
            env.push(("UMA_REDIS__COMMAND_TIMEOUT_MS", "2000"));
        }
        for (k, v) in &options.env {
            env.push((k, v));
        }
        let service = Service::with_files_env(&options.config, seed, &env);
        let started = Instant::now();
        loop {
            let ready = service.get("/readyz", &[]);
            let connected = redis.is_none() || ready.json()["redis"]["connected"] == true;
            if ready.status == 200 && connected {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "never ready: {ready:?}\n{}",
                service.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let admin = if token.is_empty() {
            closed
        } else {
            service.admin_addr()
        };
        Node {
            service,
            admin,
            token,
        }
    }

    /// An admin call with this node's token.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        self.call_as(&self.token, method, path, body)
    }

    /// An admin call with a raw body (e.g. malformed JSON) and this node's token.
    pub fn call_raw(&self, method: &str, path: &str, body: &[u8]) -> Response {
        let bearer = format!("Bearer {}", self.token);
        admin_request(self.admin, None, method, path, Some(&bearer), Some(body))
    }

    /// An admin call with another bearer token.
    pub fn call_as(&self, token: &str, method: &str, path: &str, body: Option<&Value>) -> Response {
        let bearer = format!("Bearer {token}");
        let body = body.map(|b| b.to_string().into_bytes());
        admin_request(
            self.admin,
            None,
            method,
            path,
            Some(&bearer),
            body.as_deref(),
        )
    }

    /// `call`, asserting the status, returning the JSON answer.
    pub fn expect(&self, status: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
        let r = self.call(method, path, body);
        assert_eq!(r.status, status, "{method} {path} {body:?}: {r:?}");
        r.json()
    }

    /// `PUT /admin/consumers/{username}` that must succeed (201 or 200).
    pub fn put_consumer(&self, username: &str, body: &Value) -> Value {
        let r = self.call("PUT", &format!("/admin/consumers/{username}"), Some(body));
        assert!(matches!(r.status, 200 | 201), "PUT {username}: {r:?}");
        r.json()
    }

    /// `POST /admin/consumers/{username}/keys` that must answer 201: (id, key).
    pub fn create_key(&self, username: &str, body: Option<&Value>) -> (String, String) {
        let answer = self.expect(
            201,
            "POST",
            &format!("/admin/consumers/{username}/keys"),
            body,
        );
        (
            answer["id"].as_str().expect("id").to_owned(),
            answer["key"].as_str().expect("key").to_owned(),
        )
    }

    /// `/auth` for `key` on an arbitrary URI (the test seeds have no routes: the consumer's own list).
    pub fn auth_key(&self, key: &str) -> Response {
        self.service.auth(key, "/v1/chat/completions")
    }
}

/// Asserts the answer is exactly the one an unknown key gets.
pub fn assert_refused(r: &Response, context: &str) {
    assert_eq!(r.status, 401, "{context}: {r:?}");
    assert_eq!(r.json(), json!({"message": INVALID_KEY}), "{context}");
}

/// Polls `f` every ~5 ms until it holds or `limit` passes: the time it took, or None.
pub fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if f() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// N services sharing one Redis and one seed, each with its own admin port.
pub struct Replicas {
    pub nodes: Vec<Node>,
}

impl Replicas {
    /// Starts `n` replicas in parallel, then waits (without asserting) until Redis counts `n`
    /// subscribers of `uma:invalidate`, so a test's first write is not lost to a late subscriber.
    pub fn start(redis: &Redis, n: usize, seed: &str, options: &NodeOptions) -> Replicas {
        let nodes: Vec<Node> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|_| scope.spawn(|| Node::start_with(Some(redis), seed, options)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("replica start"))
                .collect()
        });
        let _ = redis.wait_for(Duration::from_secs(5), |r| subscribers(r) >= n);
        Replicas { nodes }
    }
}

impl std::ops::Index<usize> for Replicas {
    type Output = Node;
    fn index(&self, i: usize) -> &Node {
        &self.nodes[i]
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// Subscribers of `uma:invalidate`.
pub fn subscribers(redis: &Redis) -> usize {
    let out = redis.cli(&["PUBSUB", "NUMSUB", "uma:invalidate"]);
    out.lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

const DUMP: &str = r#"
local out = {}
for _, k in ipairs(redis.call('KEYS', ARGV[1])) do
  local t = redis.call('TYPE', k)['ok']
  local v = cjson.null
  if t == 'string' then v = redis.call('GET', k)
  elseif t == 'hash' then
    v = {}
    local flat = redis.call('HGETALL', k)
    for i = 1, #flat, 2 do v[flat[i]] = flat[i + 1] end
  elseif t == 'set' then v = redis.call('SMEMBERS', k); table.sort(v)
  elseif t == 'zset' then v = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
  elseif t == 'list' then v = redis.call('LRANGE', k, 0, -1)
  elseif t == 'stream' then v = redis.call('XRANGE', k, '-', '+')
  end
  out[k] = {type = t, pttl = redis.call('PTTL', k), value = v}
end
return cjson.encode(out)
"#;

/// Every key matching `pattern` → `{"type","pttl","value"}` (hash fields as an object, sets
/// sorted), read in one script so the picture is consistent.
pub fn dump(redis: &Redis, pattern: &str) -> BTreeMap<String, Value> {
    let text = redis.cli(&["EVAL", DUMP, "0", pattern]);
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => map.into_iter().collect(),
        // cjson encodes an empty table as `{}`, but be lenient about `[]`.
        Ok(Value::Array(a)) if a.is_empty() => BTreeMap::new(),
        other => panic!("dump: {other:?} from {text}"),
    }
}

/// Every key name and every value in Redis, as one string, to search for a secret.
pub fn everything(redis: &Redis) -> String {
    serde_json::to_string(&dump(redis, "*")).expect("encode")
}

/// `PTTL` of a key (-1: no TTL, -2: no key).
pub fn pttl(redis: &Redis, key: &str) -> i64 {
    redis.cli(&["PTTL", key]).parse().expect("PTTL")
}

/// `XLEN uma:audit`.
pub fn audit_len(redis: &Redis) -> u64 {
    redis.cli(&["XLEN", "uma:audit"]).parse().expect("XLEN")
}

/// `uma:key:*` records without a TTL (operator records: admin-made keys).
pub fn operator_key_records(redis: &Redis) -> BTreeMap<String, Value> {
    dump(redis, "uma:key:*")
        .into_iter()
        .filter(|(_, v)| v["pttl"] == -1)
        .collect()
}

/// Local TCP ports of the sockets process `pid` holds to Redis (from `/proc`).
fn ports_to_redis(pid: u32, redis_port: u16) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || !inodes.contains(fields[9]) {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port(fields[2]) == Some(redis_port)
                && let Some(local) = port(fields[1])
            {
                ports.push(local);
            }
        }
    }
    ports
}

/// Redis client ids of the pub/sub connections that process `pid` holds.
pub fn pubsub_clients_of(redis: &Redis, pid: u32) -> Vec<String> {
    let ports = ports_to_redis(pid, redis.port);
    redis
        .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_owned)
            };
            let id = field("id=")?;
            let port: u16 = field("addr=")?.rsplit(':').next()?.parse().ok()?;
            ports.contains(&port).then_some(id)
        })
        .collect()
}
