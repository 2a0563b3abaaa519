//! `/auth-body` (SPEC §8.3) against the real binary: the same answers and counting as `/auth`,
//! plus the body checks — model, output tokens, input tokens counted with o200k_base — and the
//! bounds on reading bodies (size, time, partial bodies, the in-flight budget).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use user_metadata_auth::core::body::CountTokens;

const JSON: (&str, &str) = ("Content-Type", "application/json");
const MIDM: (&str, &str) = ("X-Forwarded-Uri", "/midm-base/chat");
const KEY: (&str, &str) = ("apikey", USER1_KEY);

/// A request with a body on a fresh connection (`Content-Length` from the body).
fn post(service: &Service, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw(service.addr, &bytes, false)
}

/// user1 on /midm-base/chat (kt-midm-base: 50000 input, 20000 output tokens) with a JSON body.
fn chat(service: &Service, body: &str) -> Response {
    post(service, "/auth-body", &[KEY, MIDM, JSON], body.as_bytes())
}

fn message(r: &Response) -> String {
    r.json()["message"].as_str().unwrap_or_default().to_owned()
}

fn assert_refused(r: &Response, status: u16, text: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(message(r), text, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("x-consumer-id"), None, "{r:?}");
}

fn input_tokens(r: &Response) -> u64 {
    assert_eq!(r.status, 200, "{r:?}");
    r.header("x-user-input-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no X-User-Input-Tokens: {r:?}"))
}

fn user_message(text: &str) -> String {
    serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
        .to_string()
}

/// A seed of its own: consumer `u` (key `k`) whose entry names its models, and a route only group
/// `nobody` may use.
fn models_seed() -> String {
    let mut seed =
        String::from("consumers:\n  - username: u\n    keyauth_credentials: [{key: k}]\n");
    seed.push_str(&metadata_plugin(&[("e", "openai")]));
    seed.push_str("              models: [\"gpt-4o\", \"claude-*\"]\n");
    seed.push_str("routes:\n  - name: locked\n    paths: [/locked]\n    plugins:\n      - name: acl\n        config: {allow: [nobody]}\n");
    seed
}

#[test]
fn an_allowed_body_gets_auths_answer_and_its_input_tokens() {
    let service = Service::bundled();
    let body = r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let by_body = chat(&service, body);
    assert_eq!(input_tokens(&by_body), 1);
    let by_auth = service.auth(USER1_KEY, "/midm-base/chat");
    for (name, value) in METADATA_HEADERS.iter().zip(USER1_MIDM) {
        assert_eq!(by_body.header(name), Some(value), "{name}");
        assert_eq!(by_auth.header(name), Some(value), "{name}");
    }
    assert_eq!(by_body.header("content-length"), Some("0"));
    assert_eq!(by_auth.header("x-user-input-tokens"), None);
    // Envoy's shape: the original path after /auth-body, the original method.
    let envoy = post(
        &service,
        "/auth-body/midm-base/chat",
        &[KEY, JSON],
        body.as_bytes(),
    );
    assert_eq!(input_tokens(&envoy), 1);
    assert_eq!(envoy.header("x-consumer-id"), Some("kt-midm-base"));
    // No body at all (a GET): nothing to inspect.
    let get = service.get("/auth-body", &[KEY, MIDM]);
    assert_eq!(input_tokens(&get), 0);
    // /auth-bodyx is no endpoint.
    assert_eq!(service.get("/auth-bodyx", &[KEY, MIDM]).status, 404);
}

#[test]
fn input_tokens_are_o200k_base_counts() {
    let service = Service::bundled();
    let cases = [
        ("hello world", 2),
        (
            "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times; \
             it was the age of wisdom, it was the age of foolishness. Numbers like 12345 and 3.14159 appear too.\n",
            53,
        ),
        (
            "안녕하세요, 저는 믿음 모델입니다. 오늘 날씨가 좋네요! 한국어 토큰 수를 세어 봅니다.\n",
            27,
        ),
        (
            "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{:?}\", x);\n}\n",
            37,
        ),
        ("🎉🚀 hello 👋🏽 world 🇰🇷 family: 👨‍👩‍👧‍👦\n", 28),
        // Special-token text is ordinary text: 7 tokens, never the one special token.
        ("<|endoftext|>", 7),
    ];
    let mut total = 0;
    for (text, tokens) in cases {
        assert_eq!(
            input_tokens(&chat(&service, &user_message(text))),
            tokens,
            "{text}"
        );
        total += tokens;
    }
    // Several messages: each text on its own, summed, no per-message overhead.
    let messages: Vec<_> = cases
        .iter()
        .map(|(text, _)| serde_json::json!({"role": "user", "content": text}))
        .collect();
    let body = serde_json::json!({ "messages": messages }).to_string();
    assert_eq!(input_tokens(&chat(&service, &body)), total);
}

#[test]
fn every_input_field_of_every_api_shape_counts() {
    let service = Service::bundled();
    let count = |body: serde_json::Value| input_tokens(&chat(&service, &body.to_string()));
    // Parts: only `text` and `input_text` parts of a message count.
    let parts = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello world"},
        {"type": "input_text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a-long-url-not-counted"}}
    ]}]});
    assert_eq!(count(parts), 4);
    // Anthropic: `system` as a string or as text parts.
    assert_eq!(count(serde_json::json!({"system": "hello world"})), 2);
    assert_eq!(
        count(serde_json::json!({"system": [{"type": "text", "text": "hello world"}]})),
        2
    );
    // OpenAI Responses: `instructions` and `input` (a string, or message-shaped items).
    assert_eq!(
        count(serde_json::json!({"instructions": "hello world", "input": "hello world"})),
        4
    );
    let items = serde_json::json!({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
        {"type": "message", "role": "user", "content": "hi"}
    ]});
    assert_eq!(count(items), 3);
    // Legacy completions: `prompt` as a string, strings, or token ids (one each).
    assert_eq!(count(serde_json::json!({"prompt": "hello world"})), 2);
    assert_eq!(
        count(serde_json::json!({"prompt": ["hello world", "hi"]})),
        3
    );
    assert_eq!(count(serde_json::json!({"prompt": [15339, 1917, 0]})), 3);
    assert_eq!(count(serde_json::json!({"input": [[1, 2], [3]]})), 3);
    // Tools: each definition as its compact JSON text.
    let tool =
        r#"{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}"#;
    let counter = user_metadata_auth::tokenizer::o200k().unwrap();
    let spaced = format!("{{\"tools\": [ {} ]}}", tool.replace(':', ": "));
    assert_eq!(input_tokens(&chat(&service, &spaced)), counter.count(tool));
}

#[test]
fn output_tokens_every_field_and_n() {
    let service = Service::bundled();
    let limit = "Requested output tokens exceed the limit of 20000";
    for field in ["max_completion_tokens", "max_tokens", "max_output_tokens"] {
        let at = chat(&service, &format!(r#"{{"{field}":20000}}"#));
        assert_eq!(at.status, 200, "{field}: {at:?}");
        assert_refused(
            &chat(&service, &format!(r#"{{"{field}":20001}}"#)),
            403,
            limit,
        );
        assert_eq!(
            chat(&service, &format!(r#"{{"{field}":10000,"n":2}}"#)).status,
            200
        );
        assert_refused(
            &chat(&service, &format!(r#"{{"{field}":10001,"n":2}}"#)),
            403,
            limit,
        );
        for bad in ["\"100\"", "-1", "1.5", "true"] {
            assert_refused(
                &chat(&service, &format!(r#"{{"{field}":{bad}}}"#)),
                400,
                "Invalid max_tokens",
            );
        }
    }
    // Every present field must be within the limit, whichever one the upstream reads.
    for body in [
        r#"{"max_completion_tokens":100,"max_tokens":30000}"#,
        r#"{"max_completion_tokens":30000,"max_tokens":100}"#,
        r#"{"max_output_tokens":30000,"max_tokens":100}"#,
    ] {
        assert_refused(&chat(&service, body), 403, limit);
    }
    assert_refused(
        &chat(&service, r#"{"max_tokens":10,"n":"2"}"#),
        400,
        "Invalid max_tokens",
    );
    // None present is allowed unless required.
    assert_eq!(chat(&service, &user_message("hi")).status, 200);
    let strict = Service::bundled_with_env(&[("UMA_AUTH__REQUIRE_MAX_TOKENS", "true")]);
    assert_refused(
        &chat(&strict, &user_message("hi")),
        400,
        "max_tokens is required",
    );
    assert_eq!(chat(&strict, r#"{"max_output_tokens":5}"#).status, 200);
}

#[test]
fn models_are_checked_against_the_entry() {
    let service = Service::with_files("[redis]\nurl = \"\"\n", &models_seed());
    let call = |body: &str| {
        post(
            &service,
            "/auth-body",
            &[("apikey", "k"), ("X-Forwarded-Uri", "/chat"), JSON],
            body.as_bytes(),
        )
    };
    assert_eq!(call(r#"{"model":"gpt-4o"}"#).status, 200);
    assert_eq!(call(r#"{"model":"claude-3-5-sonnet"}"#).status, 200);
    assert_refused(
        &call(r#"{"model":"gpt-4o-mini"}"#),
        403,
        "Model not allowed: gpt-4o-mini",
    );
    assert_refused(
        &call(r#"{"model":"\"x\n"}"#),
        403,
        "Model not allowed: \"x\n",
    );
    assert_refused(
        &call(r#"{"messages":[]}"#),
        403,
        "Model not allowed: (none)",
    );
    // Not JSON and not a JSON object: nothing is inspected.
    assert_eq!(call("").status, 200);
    // The model check comes before the output tokens (entry limit 50).
    assert_refused(
        &call(r#"{"model":"o1","max_tokens":51}"#),
        403,
        "Model not allowed: o1",
    );
    assert_refused(
        &call(r#"{"model":"gpt-4o","max_tokens":51}"#),
        403,
        "Requested output tokens exceed the limit of 50",
    );
    // /api/user-metadata shows the list.
    let list = service.get("/api/user-metadata", &[("apikey", "k")]).json();
    assert_eq!(list[0]["models"], serde_json::json!(["gpt-4o", "claude-*"]));
}

#[test]
fn content_types_and_invalid_bodies() {
    let service = Service::bundled();
    let send = |content_type: &str, body: &[u8]| {
        post(
            &service,
            "/auth-body",
            &[KEY, MIDM, ("Content-Type", content_type)],
            body,
        )
    };
    // Not JSON with another type: passes uninspected.
    assert_eq!(input_tokens(&send("text/plain", b"hello world")), 0);
    assert_eq!(
        input_tokens(&send("multipart/form-data; boundary=x", b"--x\r\n")),
        0
    );
    // A JSON object is inspected whatever the type says.
    let over = br#"{"max_tokens":999999}"#;
    assert_eq!(send("text/plain", over).status, 403);
    assert_eq!(
        input_tokens(&send("text/plain", br#"{"prompt":"hello world"}"#)),
        2
    );
    // JSON by type and not JSON: 400, whatever the parameters.
    let not_json = "Request body is not valid JSON";
    for body in [
        &b"{\"model\":"[..],
        b"not json",
        b"{\"prompt\":\"\xff\"}",
        "[".repeat(200_000).as_bytes(),
    ] {
        for content_type in ["application/json", "application/json; charset=utf-8"] {
            assert_refused(&send(content_type, body), 400, not_json);
        }
        assert_eq!(send("text/plain", body).status, 200);
    }
    // Valid JSON that is not an object passes.
    assert_eq!(input_tokens(&send("application/json", b"[1,2,3]")), 0);
    // An inspected field twice: refused whatever the type (parsers disagree on which wins).
    assert_refused(
        &send("text/plain", br#"{"max_tokens":1,"max_tokens":99999}"#),
        400,
        not_json,
    );
}

#[test]
fn input_over_the_limit_and_a_megabyte_prompt() {
    let service = Service::bundled_with_env(&[("UMA_AUTH__MAX_BODY_BYTES", "4194304")]);
    let counter = user_metadata_auth::tokenizer::o200k().unwrap();
    let prose = "The quick brown fox jumps over the lazy dog. ".repeat(1_048_576 / 45);
    let expected = counter.count(&prose);
    assert!(expected > 50_000);
    let started = Instant::now();
    let r = chat(&service, &user_message(&prose));
    assert_refused(
        &r,
        413,
        &format!("Input of {expected} tokens exceeds the limit of 50000"),
    );
    // A megabyte of one character: linear time, and the crate's own count.
    let run = "a".repeat(1_048_576);
    let r = chat(&service, &user_message(&run));
    assert_refused(
        &r,
        413,
        &format!(
            "Input of {} tokens exceeds the limit of 50000",
            counter.count(&run)
        ),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Just under the limit is allowed, with its count.
    let under = "hello ".repeat(49_999) + "hello";
    assert_eq!(input_tokens(&chat(&service, &user_message(&under))), 50_000);
    // The default 1 MiB bound: the megabyte prompt with its JSON around it is too large.
    let default = Service::bundled();
    assert_refused(
        &chat(&default, &user_message(&prose)),
        413,
        "Request body too large",
    );
}

#[test]
fn bodies_past_max_body_bytes_or_partial_are_413() {
    let service = Service::bundled_with_env(&[("UMA_AUTH__MAX_BODY_BYTES", "1000")]);
    let too_large = "Request body too large";
    let body = user_message(&"a ".repeat(600));
    assert_refused(&chat(&service, &body), 413, too_large);
    assert_eq!(chat(&service, &user_message("hi")).status, 200);
    // Announced larger and never sent: answered at once from the head.
    let head = format!(
        "POST /auth-body HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\nContent-Length: 5000\r\n\r\n"
    );
    assert_refused(&raw(service.addr, head.as_bytes(), false), 413, too_large);
    // Chunked, without a length: refused once the bytes read pass the bound.
    let mut chunked = format!(
        "POST /auth-body HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("1f4\r\n{}\r\n", "x".repeat(500)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_refused(&raw(service.addr, &chunked, false), 413, too_large);
    // Envoy's word that it sent only part of the body.
    for value in ["true", "TRUE"] {
        let r = post(
            &service,
            "/auth-body",
            &[KEY, MIDM, JSON, ("x-envoy-auth-partial-body", value)],
            br#"{"model":"gpt-4o"}"#,
        );
        assert_refused(&r, 413, too_large);
    }
    let whole = post(
        &service,
        "/auth-body",
        &[KEY, MIDM, JSON, ("x-envoy-auth-partial-body", "false")],
        br#"{"model":"gpt-4o"}"#,
    );
    assert_eq!(whole.status, 200);
}

#[test]
fn a_body_announced_and_never_sent_is_408_and_the_connection_closes() {
    let service = Service::bundled_with_env(&[("UMA_AUTH__BODY_TIMEOUT_MS", "300")]);
    let mut stream = TcpStream::connect(service.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST /auth-body HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    let started = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut stream, false);
    let waited = started.elapsed();
    assert_refused(&r, 408, "Request body not received");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Closed by the service, not left waiting for the rest.
    let mut rest = [0u8; 64];
    assert_eq!(read_some(&mut stream, &mut rest).unwrap_or(0), 0);
    // /auth never waits for an announced body.
    let mut stream = TcpStream::connect(service.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST /auth HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\nContent-Length: 100\r\n\r\n"
    );
    let started = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    assert_eq!(read_response(&mut stream, false).status, 200);
    assert!(started.elapsed() < Duration::from_millis(250));
}

#[test]
fn past_the_in_flight_budget_a_call_is_busy() {
    let service = Service::bundled_with_env(&[
        ("UMA_AUTH__MAX_BODY_BYTES", "1000"),
        ("UMA_AUTH__MAX_BODY_BYTES_IN_FLIGHT", "1500"),
        ("UMA_AUTH__BODY_TIMEOUT_MS", "5000"),
    ]);
    let body = user_message("hello world");
    let slow = |length: usize| {
        let mut stream = TcpStream::connect(service.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let head = format!(
            "POST /auth-body HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream
    };
    // Two slow bodies reserve 800 + 600 of 1500: a third announcing 200 does not fit.
    let padded = |n: usize| format!("{body:<n$}");
    let mut first = slow(800);
    let mut second = slow(600);
    std::thread::sleep(Duration::from_millis(300));
    let third = post(
        &service,
        "/auth-body",
        &[KEY, MIDM, JSON],
        padded(200).as_bytes(),
    );
    assert_refused(&third, 503, "Busy");
    assert_eq!(third.header("retry-after"), Some("1"));
    // A body without a length reserves max_body_bytes: refused too.
    let chunked = format!(
        "POST /auth-body HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Forwarded-Uri: /midm-base/chat\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
    )
    .into_bytes();
    assert_refused(&raw(service.addr, &chunked, false), 503, "Busy");
    // A refused key still gets its 401 first.
    let no_key = post(
        &service,
        "/auth-body",
        &[MIDM, JSON],
        padded(200).as_bytes(),
    );
    assert_eq!(no_key.status, 401);
    // Once the first body is in, its reservation is free again.
    first.write_all(padded(800).as_bytes()).unwrap();
    assert_eq!(read_response(&mut first, false).status, 200);
    let fourth = post(
        &service,
        "/auth-body",
        &[KEY, MIDM, JSON],
        padded(200).as_bytes(),
    );
    assert_eq!(input_tokens(&fourth), 2);
    second.write_all(padded(600).as_bytes()).unwrap();
    assert_eq!(read_response(&mut second, false).status, 200);
}

#[test]
fn key_and_access_refusals_win_over_body_problems() {
    let service = Service::with_files_env(
        "[redis]\nurl = \"\"\n",
        &models_seed(),
        &[("UMA_AUTH__MAX_BODY_BYTES", "100")],
    );
    let big = format!(
        r#"{{"model":"nope","max_tokens":"x","prompt":"{}"}}"#,
        "a".repeat(500)
    );
    let partial = ("x-envoy-auth-partial-body", "true");
    let chat_uri = ("X-Forwarded-Uri", "/chat");
    for extra in [vec![], vec![partial]] {
        let mut headers = vec![chat_uri, JSON];
        headers.extend(extra.iter().copied());
        let r = post(&service, "/auth-body", &headers, big.as_bytes());
        assert_refused(&r, 401, "No API key found in request");
        let mut bad_key = headers.clone();
        bad_key.push(("apikey", "wrong"));
        let r = post(&service, "/auth-body", &bad_key, big.as_bytes());
        assert_refused(&r, 401, "Invalid authentication credentials");
        let locked = [("apikey", "k"), ("X-Forwarded-Uri", "/locked"), JSON];
        let mut locked = locked.to_vec();
        locked.extend(extra.iter().copied());
        let r = post(&service, "/auth-body", &locked, big.as_bytes());
        assert_refused(&r, 403, "You cannot consume this service");
        let r = post(&service, "/auth-body", &locked, b"{not json");
        assert_refused(&r, 403, "You cannot consume this service");
    }
    // With the key and the route allowed, the body's own problems answer.
    let r = post(
        &service,
        "/auth-body",
        &[("apikey", "k"), chat_uri, JSON],
        big.as_bytes(),
    );
    assert_refused(&r, 413, "Request body too large");
}

#[test]
fn an_allowed_body_call_counts_in_the_tdl_matrix_like_auth() {
    away_from_midnight();
    let service = Service::bundled();
    for _ in 0..3 {
        assert_eq!(chat(&service, &user_message("hi")).status, 200);
    }
    assert_eq!(service.auth(USER1_KEY, "/midm-base/chat").status, 200);
    // Refused calls count nowhere.
    assert_eq!(chat(&service, r#"{"max_tokens":99999}"#).status, 403);
    assert_eq!(chat(&service, "{bad").status, 400);
    let tdl = service.get("/api/tdl-matrix", &[KEY]).json();
    let entry = tdl["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "kt-midm-base")
        .expect("kt-midm-base");
    let used: u64 = entry["usage"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(used, 4, "{tdl}");
    // Metrics label the endpoint and the body refusals.
    let metrics = service.get("/metrics", &[]).body;
    for series in [
        "uma_requests_total{endpoint=\"auth_body\",decision=\"allow\"} 3",
        "uma_requests_total{endpoint=\"auth_body\",decision=\"output_tokens\"} 1",
        "uma_requests_total{endpoint=\"auth_body\",decision=\"bad_body\"} 1",
    ] {
        assert!(metrics.contains(series), "{series}\n{metrics}");
    }
    // /auth never gives a body refusal: no dead series for it.
    assert!(metrics.contains("uma_requests_total{endpoint=\"auth\",decision=\"allow\"} 1"));
    assert!(!metrics.contains("endpoint=\"auth\",decision=\"busy\""));
}
