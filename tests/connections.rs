//! The connection rules of SPEC §2 against the real binary: header and idle timeouts (HTTP/1.1 and
//! HTTP/2), the connection limit, running out of descriptors under a low `ulimit -n`, and the
//! signals that must not stop the service.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

/// Slack on every SPEC bound: the machine is shared and the tests run in parallel.
const SLACK: Duration = Duration::from_secs(2);
const HEADER_TIMEOUT_MS: &str = "300";

fn ms(value: &str) -> Duration {
    Duration::from_millis(value.parse().expect("milliseconds"))
}

fn connect(service: &Service) -> TcpStream {
    let stream = TcpStream::connect(service.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// One keep-alive request on `stream`.
fn ask(stream: &mut TcpStream, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write request");
    read_response(stream, false)
}

fn healthz(stream: &mut TcpStream) -> u16 {
    ask(stream, "/healthz", &[]).status
}

/// Reads (discarding) until the service closes the connection; how long that took. Panics if it
/// is still open after `limit`.
fn wait_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?} ({e})", started.elapsed()),
        }
    }
    let took = started.elapsed();
    assert!(
        took <= limit + Duration::from_millis(100),
        "closed only after {took:?}"
    );
    took
}

/// True if the service has closed `stream` (without waiting for it).
fn is_closed(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn silent_and_partial_heads_are_closed_within_the_header_timeout() {
    let service = Service::bundled_with_env(&[
        ("UMA_SERVER__HEADER_READ_TIMEOUT_MS", HEADER_TIMEOUT_MS),
        ("UMA_SERVER__IDLE_TIMEOUT_MS", "60000"),
    ]);
    let mut silent = connect(&service);
    let mut partial_head = connect(&service);
    partial_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut partial_preface = connect(&service);
    partial_preface.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    // On a keep-alive connection, the next head is timed from its first byte, not by the idle
    // timeout (60 s here).
    let mut later_head = connect(&service);
    assert_eq!(healthz(&mut later_head), 200);
    later_head.write_all(b"GET /heal").unwrap();
    let bound = ms(HEADER_TIMEOUT_MS) + SLACK;
    for (name, stream) in [
        ("nothing sent", &mut silent),
        ("partial HTTP/1.1 head", &mut partial_head),
        ("partial HTTP/2 preface", &mut partial_preface),
        ("partial second head", &mut later_head),
    ] {
        let took = wait_closed(stream, bound);
        eprintln!("{name}: closed after {took:?}");
    }
    // The service itself is unharmed.
    assert_eq!(service.get("/healthz", &[]).status, 200);
}

#[test]
fn an_idle_keep_alive_connection_is_reused_within_the_idle_timeout_and_closed_after_it() {
    const IDLE_MS: &str = "2000";
    let service = Service::bundled_with_env(&[
        ("UMA_SERVER__HEADER_READ_TIMEOUT_MS", HEADER_TIMEOUT_MS),
        ("UMA_SERVER__IDLE_TIMEOUT_MS", IDLE_MS),
    ]);
    let mut stream = connect(&service);
    assert_eq!(healthz(&mut stream), 200);
    // Three header timeouts of idleness, well within the idle timeout: hyper's own header timer
    // (review D12) would have closed the connection by now.
    std::thread::sleep(ms(HEADER_TIMEOUT_MS) * 3);
    let answer = ask(
        &mut stream,
        "/auth",
        &[
            ("apikey", USER1_KEY),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("connection"), None, "kept alive");
    let took = wait_closed(&mut stream, ms(IDLE_MS) + SLACK);
    eprintln!("idle keep-alive closed after {took:?}");
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 4;
const HEADERS: u8 = 1;
const GOAWAY: u8 = 7;

fn h2_frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The next frame (kind, flags, stream, payload), acknowledging the server's SETTINGS.
fn h2_read_frame(stream: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).expect("an HTTP/2 frame");
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).expect("frame payload");
    if head[3] == SETTINGS && head[4] & 1 == 0 {
        stream.write_all(&h2_frame(SETTINGS, 1, 0, &[])).unwrap();
    }
    (head[3], head[4], id, payload)
}

/// GET `path` on stream `id`; true if the answer's status is 200.
fn h2_get_ok(stream: &mut TcpStream, id: u32, path: &str) -> bool {
    // HPACK: :method GET, :scheme http (static table), then :path and :authority as literals
    // without indexing (name from the static table, value not Huffman-coded).
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'x']);
    // END_STREAM | END_HEADERS
    stream
        .write_all(&h2_frame(HEADERS, 0x5, id, &block))
        .unwrap();
    loop {
        let (kind, _, stream_id, payload) = h2_read_frame(stream);
        if kind == HEADERS && stream_id == id {
            // 0x88 is ":status: 200" from the static table.
            return payload.first() == Some(&0x88);
        }
        assert_ne!(kind, GOAWAY, "GOAWAY while a request was due");
    }
}

#[test]
fn http2_requests_share_a_connection_until_the_idle_timeout_sends_goaway() {
    const IDLE_MS: &str = "1000";
    let service = Service::bundled_with_env(&[
        ("UMA_SERVER__HEADER_READ_TIMEOUT_MS", HEADER_TIMEOUT_MS),
        ("UMA_SERVER__IDLE_TIMEOUT_MS", IDLE_MS),
    ]);
    let mut stream = connect(&service);
    stream.write_all(H2_PREFACE).unwrap();
    stream.write_all(&h2_frame(SETTINGS, 0, 0, &[])).unwrap();
    assert!(h2_get_ok(&mut stream, 1, "/healthz"));
    // A complete preface is not held to the header timeout: idle past it, the connection serves.
    std::thread::sleep(ms(HEADER_TIMEOUT_MS) * 2);
    assert!(h2_get_ok(&mut stream, 3, "/healthz"));
    let idle_since = Instant::now();
    stream.set_read_timeout(Some(ms(IDLE_MS) + SLACK)).unwrap();
    loop {
        let (kind, ..) = h2_read_frame(&mut stream);
        if kind == GOAWAY {
            break;
        }
    }
    let goaway = idle_since.elapsed();
    assert!(goaway <= ms(IDLE_MS) + SLACK, "GOAWAY after {goaway:?}");
    // This client never answers the PING that follows GOAWAY: the service drops it anyway.
    wait_closed(&mut stream, Duration::from_secs(1) + SLACK);
}

#[test]
fn at_the_limit_a_new_connection_closes_the_longest_idle_one() {
    let service = Service::bundled_with_env(&[("UMA_SERVER__MAX_CONNECTIONS", "4")]);
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = connect(&service);
            assert_eq!(healthz(&mut stream), 200);
            std::thread::sleep(Duration::from_millis(20));
            stream
        })
        .collect();
    // The first one answers again, so the second is now the longest idle, not the first accepted.
    assert_eq!(healthz(&mut open[0]), 200);
    let mut newcomer = connect(&service);
    assert_eq!(healthz(&mut newcomer), 200);
    wait_closed(&mut open[1], SLACK);
    for (i, stream) in open.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert!(!is_closed(stream), "connection {i} was closed");
        assert_eq!(healthz(stream), 200, "connection {i}");
    }
    // The log line is read from the child's stderr by another thread: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !service.logs().contains("at the connection limit") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(service.logs().contains("at the connection limit"));
}

fn wait_redis_connected(service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.get("/readyz", &[]).json()["redis"]["connected"] != true {
        assert!(Instant::now() < deadline, "Redis never connected");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_connection_with_a_request_in_flight_is_never_the_one_closed() {
    let redis = Redis::start();
    let url = redis.url();
    let service = Service::bundled_with_env(&[
        ("UMA_REDIS__URL", &url),
        // A frozen Redis holds the first lookup this long: a request truly in flight. (New
        // connections to Redis are bounded by the connect timeout.)
        ("UMA_REDIS__COMMAND_TIMEOUT_MS", "2000"),
        ("UMA_REDIS__CONNECT_TIMEOUT_MS", "2000"),
        ("UMA_SERVER__MAX_CONNECTIONS", "3"),
    ]);
    wait_redis_connected(&service);
    redis.freeze();
    let mut busy = connect(&service);
    let auth = format!(
        "GET /auth HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\n\r\n"
    );
    busy.write_all(auth.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let mut first_idle = connect(&service);
    assert_eq!(healthz(&mut first_idle), 200);
    std::thread::sleep(Duration::from_millis(20));
    let mut second_idle = connect(&service);
    assert_eq!(healthz(&mut second_idle), 200);
    // Full. `busy` was accepted first, but its request is in flight: `first_idle` goes.
    let mut newcomer = connect(&service);
    assert_eq!(healthz(&mut newcomer), 200);
    wait_closed(&mut first_idle, SLACK);
    let answer = read_response(&mut busy, false);
    redis.thaw();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("connection"), None, "not being closed");
    assert_eq!(healthz(&mut busy), 200);
    assert_eq!(healthz(&mut second_idle), 200);
}

#[test]
fn out_of_descriptors_the_service_still_answers_at_once() {
    let mut command = Command::new("prlimit");
    command
        .args(["--nofile=256:256", BIN, "serve"])
        .current_dir(manifest_dir());
    // High, so that only eviction, never the header timeout, can free a descriptor in time.
    let service = Service::spawn(
        command,
        &[("UMA_SERVER__HEADER_READ_TIMEOUT_MS", "30000")],
        None,
    );
    let deadline = Instant::now() + SLACK;
    while !service.logs().contains("open_file_limit=256") {
        assert!(Instant::now() < deadline, "{}", service.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // 256 less the reserve for Redis, logs and the runtime.
    assert!(
        service.logs().contains("max_connections=192"),
        "{}",
        service.logs()
    );
    // Now lower the limit under the service's feet, below that bound: accept hits EMFILE.
    let pid = service.pid().to_string();
    let lowered = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=100:100"])
        .status()
        .expect("prlimit");
    assert!(lowered.success());
    let flood_started = Instant::now();
    let _silent: Vec<TcpStream> = (0..300).map(|_| connect(&service)).collect();
    let started = Instant::now();
    let answer = service.auth(USER1_KEY, "/midm-base/chat");
    let took = started.elapsed();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    let logs = service.logs();
    let warnings = logs.matches("out of file descriptors").count();
    let seconds = flood_started.elapsed().as_secs() as usize;
    assert!(warnings >= 1, "EMFILE never reported:\n{logs}");
    assert!(
        warnings <= seconds + 2,
        "{warnings} warnings in {seconds} s:\n{logs}"
    );
}

#[test]
fn sighup_sigusr1_and_sigusr2_leave_the_service_serving() {
    let service = Service::bundled();
    let pid = service.pid().to_string();
    for (signal, logged) in [
        // SIGHUP reloads (SPEC §10; tests/reload.rs) and keeps serving.
        ("-HUP", "seed reloaded"),
        ("-USR1", "SIGUSR1: ignored"),
        ("-USR2", "SIGUSR2: ignored"),
    ] {
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + SLACK;
        while !service.logs().contains(logged) {
            assert!(Instant::now() < deadline, "{signal}: {}", service.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(service.get("/healthz", &[]).status, 200, "after {signal}");
    }
    let status = service
        .terminate(Duration::from_secs(8))
        .expect("exited after SIGTERM");
    assert!(status.success(), "{status:?}");
}
