//! `/auth` over real sockets against the real binary: every row of the SPEC §4 answer table, key
//! locations, entry selection, Kong precedence, ACLs, path normalization and gateway request shapes.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn assert_denied(r: &Response, status: u16, message: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.json()["message"], message, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    for name in METADATA_HEADERS {
        assert_eq!(r.header(name), None, "{name} on a deny answer");
    }
    let realm = r.header("www-authenticate");
    if status == 401 {
        assert_eq!(realm, Some(r#"Key realm="user-metadata-auth""#));
    } else {
        assert_eq!(realm, None);
    }
}

fn consumer_id(r: &Response) -> Option<&str> {
    assert_eq!(r.status, 200, "{r:?}");
    r.header("x-consumer-id")
}

#[test]
fn seed_document_example_user1_on_midm() {
    let service = Service::bundled();
    let r = service.auth(USER1_KEY, "/midm-base/chat");
    assert_eq!(r.status, 200, "{r:?}");
    for (name, value) in METADATA_HEADERS.iter().zip(USER1_MIDM) {
        assert_eq!(r.header_count(name), 1, "{name} must be single-valued");
        assert_eq!(r.header(name), Some(value), "{name}");
    }
    assert_eq!(r.header("content-length"), Some("0"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.body.is_empty());
    let total: usize = METADATA_HEADERS
        .iter()
        .map(|h| r.header(h).unwrap().len())
        .sum();
    assert!(total < 4096, "headers take {total} bytes");
}

#[test]
fn seed_document_example_admin_and_acl() {
    let service = Service::bundled();
    let r = service.auth(ADMIN_KEY, "/gpt4o/chat");
    assert_eq!(consumer_id(&r), Some("azure-gpt4o"));
    assert_eq!(r.header("x-user-provider"), Some("azure"));
    assert_eq!(r.header("x-user-input-cost"), Some("0.00000003"));
    assert_eq!(r.header("x-user-output-cost"), Some("0.00000006"));
    assert_eq!(r.header("x-user-tags"), Some(r#"["azure","GPT4o"]"#));
    assert_eq!(
        r.header("x-consumer-groups"),
        Some("openai-allowed, midm-allowed")
    );
    assert_eq!(
        consumer_id(&service.auth(ADMIN_KEY, "/midm-base/chat")),
        Some("kt-midm-base")
    );
    assert_denied(
        &service.auth(USER1_KEY, "/gpt4o/chat"),
        403,
        "You cannot consume this service",
    );
}

#[test]
fn deny_table_rows() {
    let service = Service::bundled();
    assert_denied(
        &service.get("/auth", &[("X-Forwarded-Uri", "/midm-base/chat")]),
        401,
        "No API key found in request",
    );
    assert_denied(
        &service.auth("not-a-key", "/midm-base/chat"),
        401,
        "Invalid authentication credentials",
    );
    let uri = ("X-Forwarded-Uri", "/midm-base/chat");
    let twice = service.get(
        "/auth",
        &[("apikey", USER1_KEY), ("apikey", USER1_KEY), uri],
    );
    assert_denied(&twice, 401, "Duplicate API key found");
    let twice = service.get(
        "/auth",
        &[("x-api-key", USER1_KEY), ("X-Api-Key", "other"), uri],
    );
    assert_denied(&twice, 401, "Duplicate API key found");
    let in_query = service.get(
        "/auth",
        &[(
            "X-Forwarded-Uri",
            &format!("/midm-base/chat?apikey={USER1_KEY}&apikey=x"),
        )],
    );
    assert_denied(&in_query, 401, "Duplicate API key found");
    assert_denied(
        &service.auth(USER1_KEY, "/gpt4o/chat"),
        403,
        "You cannot consume this service",
    );
    // 400s: no URI anywhere, an unreadable one, sources that disagree.
    assert_denied(
        &service.get("/auth", &[("apikey", USER1_KEY)]),
        400,
        "Original URI missing",
    );
    let bad = service.get(
        "/auth",
        &[("apikey", USER1_KEY), ("X-Original-URI", "gpt4o/chat")],
    );
    assert_denied(&bad, 400, "Invalid original URI");
    let conflicting = service.get(
        "/auth",
        &[
            ("apikey", USER1_KEY),
            ("X-Original-URI", "/gpt4o/chat"),
            ("X-Forwarded-Uri", "/x"),
        ],
    );
    assert_denied(&conflicting, 400, "Conflicting original request");
}

#[test]
fn a_gateway_secret_is_required_when_set() {
    let service =
        Service::bundled_with_env(&[("UMA_AUTH__GATEWAY_SECRET", "s3cret-of-the-gateway")]);
    let uri = ("X-Forwarded-Uri", "/midm-base/chat");
    let r = service.get("/auth", &[("apikey", USER1_KEY), uri]);
    assert_denied(&r, 401, "Unknown gateway");
    let r = service.get(
        "/auth",
        &[("apikey", USER1_KEY), uri, ("X-Uma-Gateway", "wrong")],
    );
    assert_denied(&r, 401, "Unknown gateway");
    let r = service.get(
        "/auth",
        &[
            ("apikey", USER1_KEY),
            uri,
            ("X-Uma-Gateway", "s3cret-of-the-gateway"),
        ],
    );
    assert_eq!(consumer_id(&r), Some("kt-midm-base"));
    // The 400 checks come first (SPEC §4 order, step 1).
    assert_denied(
        &service.get("/auth", &[("apikey", USER1_KEY)]),
        400,
        "Original URI missing",
    );
    // `/api/*` is for clients, not gateways: no secret there.
    assert_eq!(
        service
            .get("/api/user-metadata", &[("apikey", USER1_KEY)])
            .status,
        200
    );
}

#[test]
fn every_key_location() {
    let service = Service::bundled();
    let uri = ("X-Forwarded-Uri", "/midm-base/chat");
    let bearer = format!("Bearer {USER1_KEY}");
    for header in [
        ("apikey", USER1_KEY),
        ("x-api-key", USER1_KEY),
        ("Authorization", bearer.as_str()),
    ] {
        let r = service.get("/auth", &[header, uri]);
        assert_eq!(
            r.header("x-consumer-username"),
            Some("user1-client"),
            "{header:?}: {r:?}"
        );
    }
    let query = format!("/midm-base/chat?x=1&apikey={USER1_KEY}");
    let r = service.get("/auth", &[("X-Forwarded-Uri", &query)]);
    assert_eq!(
        r.header("x-consumer-username"),
        Some("user1-client"),
        "{r:?}"
    );
    // First found wins: the header beats the query, and an empty header counts as absent.
    let r = service.get(
        "/auth",
        &[("apikey", ADMIN_KEY), ("X-Forwarded-Uri", &query)],
    );
    assert_eq!(r.header("x-consumer-username"), Some("admin-client"));
    let r = service.get("/auth", &[("apikey", ""), ("x-api-key", ADMIN_KEY), uri]);
    assert_eq!(r.header("x-consumer-username"), Some("admin-client"));
}

#[test]
fn original_uri_sources() {
    let service = Service::bundled();
    // Envoy: /auth/<original path and query>.
    let envoy = service.get(&format!("/auth/midm-base/chat?apikey={USER1_KEY}"), &[]);
    assert_eq!(consumer_id(&envoy), Some("kt-midm-base"));
    let envoy = service.get("/auth/gpt4o/chat", &[("apikey", USER1_KEY)]);
    assert_denied(&envoy, 403, "You cannot consume this service");
    // A client's own X-Forwarded-Uri beside Envoy's path: refused, never believed (auto).
    let spoof = service.get(
        "/auth/gpt4o/chat",
        &[
            ("apikey", USER1_KEY),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    assert_denied(&spoof, 400, "Conflicting original request");
    // nginx convention.
    let nginx = service.get(
        "/auth",
        &[("apikey", ADMIN_KEY), ("X-Original-URI", "/gpt4o/chat")],
    );
    assert_eq!(consumer_id(&nginx), Some("azure-gpt4o"));
    // Both present and agreeing after normalization.
    let both = service.get(
        "/auth",
        &[
            ("apikey", ADMIN_KEY),
            ("X-Forwarded-Uri", "/gpt4o/./chat"),
            ("X-Original-URI", "/gpt4o/chat"),
        ],
    );
    assert_eq!(consumer_id(&both), Some("azure-gpt4o"));
    // A lone /auth/ is a source too.
    let lone = service.get(
        "/auth/",
        &[("apikey", USER1_KEY), ("X-Original-URI", "/gpt4o/chat")],
    );
    assert_denied(&lone, 400, "Conflicting original request");
}

#[test]
fn an_explicit_source_set_ignores_the_others() {
    let service = Service::bundled_with_env(&[("UMA_AUTH__ORIGINAL_REQUEST", "original")]);
    let r = service.get(
        "/auth",
        &[
            ("apikey", USER1_KEY),
            ("X-Original-URI", "/gpt4o/chat"),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    assert_denied(&r, 403, "You cannot consume this service");
    let r = service.get(
        "/auth",
        &[
            ("apikey", USER1_KEY),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    assert_denied(&r, 400, "Original URI missing");
    let path = Service::bundled_with_env(&[("UMA_AUTH__ORIGINAL_REQUEST", "path")]);
    let r = path.get(
        "/auth/midm-base/chat",
        &[("apikey", USER1_KEY), ("X-Original-URI", "/gpt4o/chat")],
    );
    assert_eq!(consumer_id(&r), Some("kt-midm-base"));
    let fallback = Service::bundled_with_env(&[("UMA_AUTH__DEFAULT_URI", "/")]);
    assert_eq!(
        consumer_id(&fallback.get("/auth", &[("apikey", USER1_KEY)])),
        Some("kt-midm-base")
    );
}

/// `GET /auth` with `X-Original-URI` set to raw bytes (nginx passes a client's bytes as they came).
fn auth_with_raw_uri(service: &Service, key: &str, uri: &[u8]) -> Response {
    let mut head =
        format!("GET /auth HTTP/1.1\r\nHost: x\r\napikey: {key}\r\nX-Original-URI: ").into_bytes();
    head.extend_from_slice(uri);
    head.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    raw(service.addr, &head, false)
}

#[test]
fn non_ascii_bytes_never_skip_the_acl() {
    let service = Service::bundled();
    for uri in [
        "/gpt4o/chat?x=é".as_bytes(),
        b"/gpt4o/chat\xff",
        "/gpt4o/chät/../chat".as_bytes(),
    ] {
        let r = auth_with_raw_uri(&service, USER1_KEY, uri);
        assert_denied(&r, 403, "You cannot consume this service");
    }
    // The admin passes with the same bytes: the route is read, not refused.
    let r = auth_with_raw_uri(&service, ADMIN_KEY, "/gpt4o/chat?x=é".as_bytes());
    assert_eq!(consumer_id(&r), Some("azure-gpt4o"));
    // A control character is refused, never skipped.
    let r = auth_with_raw_uri(&service, ADMIN_KEY, b"/gpt4o/\tchat");
    assert_denied(&r, 400, "Invalid original URI");
}

#[test]
fn normalized_paths_cannot_slip_past_an_acl() {
    let service = Service::bundled();
    for uri in [
        "/midm-base/../gpt4o/chat",
        "/gpt4o/%63hat",
        "//gpt4o//chat",
        "/gpt4o/./chat",
        "/x/%2e%2e/gpt4o/chat",
        "/gpt4o%2Fchat",
        // Readings an upstream may have (SPEC §5): backslashes, `;` parameters, case, plain
        // prefixes (Kong and nginx route /gpt4o/chatter to the /gpt4o/chat upstream), and dot
        // segments an upstream does not remove.
        "/gpt4o\\chat",
        "/gpt4o%5Cchat",
        "/gpt4o;v=1/chat",
        "/GPT4O/Chat",
        "/gpt4o/chatter",
        "/gpt4o/chat/../../x",
    ] {
        assert_denied(
            &service.auth(USER1_KEY, uri),
            403,
            "You cannot consume this service",
        );
    }
    let envoy = service.get("/auth//gpt4o/./chat", &[("apikey", USER1_KEY)]);
    assert_denied(&envoy, 403, "You cannot consume this service");
    assert_eq!(
        consumer_id(&service.auth(ADMIN_KEY, "/gpt4o/chatter")),
        Some("azure-gpt4o")
    );
}

#[test]
fn every_method_gets_a_decision() {
    let service = Service::bundled();
    let headers = [
        ("apikey", USER1_KEY),
        ("X-Forwarded-Uri", "/midm-base/chat"),
    ];
    for method in ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = request(service.addr, method, "/auth", &headers);
        assert_eq!(consumer_id(&r), Some("kt-midm-base"), "{method}");
        let r = request(service.addr, method, "/auth/x", &[]);
        assert_eq!(r.status, 401, "{method}");
    }
    let head = request(service.addr, "HEAD", "/auth", &headers);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-consumer-id"), Some("kt-midm-base"));
    assert_eq!(request(service.addr, "HEAD", "/auth/x", &[]).status, 401);
}

#[test]
fn forwarded_method_selects_among_routes() {
    let seed = format!(
        "consumers:\n  - username: a\n    keyauth_credentials: [{{key: ka}}]\n{}routes:\n  - name: post-only\n    paths: [/chat]\n    methods: [POST]\n    plugins:\n      - name: acl\n        config: {{allow: [writers]}}\n  - name: get-only\n    paths: [/chat]\n    methods: [GET]\n",
        metadata_plugin(&[("e", "p")])
    );
    let service = Service::with_files("", &seed);
    let post = service.get(
        "/auth",
        &[
            ("apikey", "ka"),
            ("X-Forwarded-Uri", "/chat"),
            ("X-Forwarded-Method", "POST"),
        ],
    );
    assert_denied(&post, 403, "You cannot consume this service");
    let post = service.get(
        "/auth",
        &[
            ("apikey", "ka"),
            ("X-Original-URI", "/chat"),
            ("X-Original-Method", "POST"),
        ],
    );
    assert_eq!(post.status, 403);
    let get = service.get(
        "/auth",
        &[
            ("apikey", "ka"),
            ("X-Forwarded-Uri", "/chat"),
            ("X-Forwarded-Method", "GET"),
        ],
    );
    assert_eq!(consumer_id(&get), Some("e"));
}

#[test]
fn a_promised_body_that_never_comes_does_not_delay_the_answer() {
    let service = Service::bundled();
    let mut stream = TcpStream::connect(service.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let started = Instant::now();
    let head = format!(
        "POST /auth HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Original-URI: /midm-base/chat\r\nContent-Length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut stream, false);
    assert_eq!(consumer_id(&r), Some("kt-midm-base"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn keep_alive_connections_serve_many_decisions() {
    let service = Service::bundled();
    let mut stream = TcpStream::connect(service.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..20 {
        let head = format!(
            "GET /auth HTTP/1.1\r\nHost: x\r\napikey: {USER1_KEY}\r\nX-Original-URI: /midm-base/chat\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let r = read_response(&mut stream, false);
        assert_eq!(consumer_id(&r), Some("kt-midm-base"));
    }
}

fn precedence_seed() -> String {
    let sha = {
        let out = std::process::Command::new(BIN)
            .args(["hash-key", "hashed-key"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    format!(
        r#"_format_version: "3.0"
consumers:
  - username: own
    custom_id: c-own
    keyauth_credentials: [{{key: own-key}}]
    acls: [{{group: g1}}]
{own}  - username: bare
    keyauth_credentials: [{{key: bare-key}}]
    acls: [{{group: g1}}, {{group: vip}}]
  - username: banned
    keyauth_credentials: [{{key_sha256: "{sha}"}}]
    acls: [{{group: banned}}]
routes:
  - name: listed
    paths: [/listed]
{route}services:
  - name: svc
    url: http://upstream
    routes:
      - name: nested
        paths: [/nested]
        plugins:
          - name: acl
            config: {{deny: [banned]}}
plugins:
  - name: user-metadata
    config:
      metadata_list:
{global}"#,
        own = metadata_plugin(&[("own-a", "p"), ("own-b", "q")]),
        route = metadata_plugin(&[("route-a", "r"), ("route-b", "s")]),
        global = entry_yaml("global-a", "g")
            .replace("            - id", "        - id")
            .replace("\n              ", "\n          "),
    )
}

const PRECEDENCE_CONFIG: &str = r#"
[[routes]]
prefix = "/pinned"
metadata_id = "own-b"

[[routes]]
prefix = "/vip/"
allow_groups = ["vip"]

[[routes]]
prefix = "/nog1"
deny_groups = ["g1"]
"#;

fn select(
    service: &Service,
    key: &str,
    auth_url: &str,
    uri: &str,
    header: Option<&str>,
) -> Response {
    let mut headers = vec![("apikey", key), ("X-Forwarded-Uri", uri)];
    if let Some(id) = header {
        headers.push(("X-Metadata-Id", id));
    }
    service.get(auth_url, &headers)
}

/// A service that honours both entry selectors (SPEC §4: they are off by default).
fn selecting(config: &str, seed: &str) -> Service {
    Service::with_files_env(
        config,
        seed,
        &[("UMA_AUTH__ENTRY_SELECTORS", "query,header")],
    )
}

#[test]
fn entry_selectors_are_off_by_default() {
    let service = Service::with_files(PRECEDENCE_CONFIG, &precedence_seed());
    let r = select(
        &service,
        "own-key",
        "/auth?metadata_id=own-b",
        "/free",
        Some("own-b"),
    );
    assert_eq!(consumer_id(&r), Some("own-a"));
}

#[test]
fn entry_selection_rules_in_order() {
    let service = selecting(PRECEDENCE_CONFIG, &precedence_seed());
    // 1. the config route's pin beats the URL and the header.
    let r = select(
        &service,
        "own-key",
        "/auth?metadata_id=own-a",
        "/pinned/x",
        Some("own-a"),
    );
    assert_eq!(consumer_id(&r), Some("own-b"));
    // 2. metadata_id on the /auth URL beats the header.
    let r = select(
        &service,
        "own-key",
        "/auth?metadata_id=own-b",
        "/free",
        Some("own-a"),
    );
    assert_eq!(consumer_id(&r), Some("own-b"));
    // 3. the header.
    let r = select(&service, "own-key", "/auth", "/free", Some("own-b"));
    assert_eq!(consumer_id(&r), Some("own-b"));
    // 4. the first entry; empty values count as absent.
    let r = select(&service, "own-key", "/auth?metadata_id=", "/free", Some(""));
    assert_eq!(consumer_id(&r), Some("own-a"));
    // On /auth/<path> the query is the client's: it cannot choose the entry.
    let r = service.get("/auth/free?metadata_id=own-b", &[("apikey", "own-key")]);
    assert_eq!(consumer_id(&r), Some("own-a"));
    // An id not in the applicable list is refused.
    let r = select(&service, "own-key", "/auth", "/free", Some("route-a"));
    assert_denied(&r, 403, "You cannot consume this service");
    let r = select(&service, "bare-key", "/auth", "/pinned/x", None);
    assert_denied(&r, 403, "You cannot consume this service");
    // One selector given twice with different values.
    let r = select(
        &service,
        "own-key",
        "/auth?metadata_id=own-a&metadata_id=own-b",
        "/free",
        None,
    );
    assert_denied(&r, 400, "Conflicting metadata_id");
    let r = service.get(
        "/auth",
        &[
            ("apikey", "own-key"),
            ("X-Forwarded-Uri", "/free"),
            ("X-Metadata-Id", "own-a"),
            ("X-Metadata-Id", "own-b"),
        ],
    );
    assert_denied(&r, 400, "Conflicting metadata_id");
}

#[test]
fn kong_precedence_consumer_route_global() {
    let service = selecting(PRECEDENCE_CONFIG, &precedence_seed());
    assert_eq!(
        consumer_id(&select(&service, "own-key", "/auth", "/listed", None)),
        Some("own-a")
    );
    assert_eq!(
        consumer_id(&select(&service, "bare-key", "/auth", "/listed/sub", None)),
        Some("route-a")
    );
    assert_eq!(
        consumer_id(&select(
            &service,
            "bare-key",
            "/auth",
            "/listed",
            Some("route-b")
        )),
        Some("route-b")
    );
    assert_eq!(
        consumer_id(&select(&service, "bare-key", "/auth", "/elsewhere", None)),
        Some("global-a")
    );
    // A plain prefix: /listedx is under /listed, as Kong and nginx route it.
    let r = select(&service, "bare-key", "/auth", "/listedx", None);
    assert_eq!(consumer_id(&r), Some("route-a"));
    let r = select(&service, "bare-key", "/auth", "/liste", None);
    assert_eq!(consumer_id(&r), Some("global-a"));
    assert_eq!(
        r.header("x-consumer-custom-id"),
        Some(""),
        "empty, never omitted"
    );
    assert_eq!(r.header_count("x-consumer-custom-id"), 1);
    assert_eq!(r.header("x-consumer-groups"), Some("g1, vip"));
}

#[test]
fn acl_allow_and_deny_from_both_route_sets() {
    let service = Service::with_files(PRECEDENCE_CONFIG, &precedence_seed());
    // Seed route nested under services[] with `deny`; the key is stored as key_sha256.
    assert_denied(
        &select(&service, "hashed-key", "/auth", "/nested/x", None),
        403,
        "You cannot consume this service",
    );
    assert_eq!(
        consumer_id(&select(&service, "hashed-key", "/auth", "/other", None)),
        Some("global-a")
    );
    assert_eq!(
        consumer_id(&select(&service, "own-key", "/auth", "/nested", None)),
        Some("own-a")
    );
    // Config routes: allow_groups and deny_groups.
    assert_denied(
        &select(&service, "own-key", "/auth", "/vip/a", None),
        403,
        "You cannot consume this service",
    );
    assert_eq!(
        consumer_id(&select(&service, "bare-key", "/auth", "/vip", None)),
        Some("global-a")
    );
    assert_denied(
        &select(&service, "bare-key", "/auth", "/nog1", None),
        403,
        "You cannot consume this service",
    );
    // The digest is the key's only form: the hex string itself is not a key.
    let sha = std::process::Command::new(BIN)
        .args(["hash-key", "hashed-key"])
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    assert_denied(
        &select(&service, sha.trim(), "/auth", "/x", None),
        401,
        "Invalid authentication credentials",
    );
}

#[test]
fn header_values_are_formatted_exactly() {
    let seed = r#"
consumers:
  - username: "fmt"
    keyauth_credentials: [{key: fk}]
    plugins:
      - name: user-metadata
        config:
          metadata_list:
            - id: "fmt-1"
              provider_name: "p"
              tags: ["kt", "믿음", "say \"hi\"", "back\\slash"]
              tdl_matrix:
                T1: [0, 1.5, 2.0, 3]
                T2: []
                T3: [0]
                T4: [0]
                T5: [0]
                T6: [0]
                T7: [0]
                T8: [0]
                T9: [0]
                T10: [0]
                T11: [0]
                T12: [9007199254740993]
              capabilities: [1, 0, 1]
              max_input_tokens: 9007199254740993
              max_output_tokens: 0
              input_cost_per_token: 1.5e-7
              output_cost_per_token: 6.0e-05
            - id: "fmt-2"
              provider_name: "p"
              tdl_matrix: {T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}
              capabilities: []
              max_input_tokens: 1
              max_output_tokens: 2
              input_cost_per_token: 2.0
              output_cost_per_token: 0
            - id: "fmt-3"
              provider_name: "p"
              tdl_matrix: {T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}
              capabilities: [0]
              max_input_tokens: 1
              max_output_tokens: 2
              input_cost_per_token: 5e-08
              output_cost_per_token: 0.0000002
"#;
    let service = selecting("", seed);
    let r = select(&service, "fk", "/auth", "/x", Some("fmt-1"));
    assert_eq!(
        r.header("x-user-tags"),
        Some(r#"["kt","\ubbff\uc74c","say \"hi\"","back\\slash"]"#)
    );
    let matrix = r.header("x-user-tdl-matrix").unwrap();
    assert!(
        matrix.starts_with(r#"{"T1":[0,1.5,2,3],"T2":[],"T3":[0]"#),
        "{matrix}"
    );
    assert!(matrix.ends_with(r#""T12":[9007199254740993]}"#), "{matrix}");
    assert_eq!(r.header("x-user-capabilities"), Some("[1,0,1]"));
    assert_eq!(
        r.header("x-user-max-input-tokens"),
        Some("9007199254740993")
    );
    assert_eq!(r.header("x-user-max-output-tokens"), Some("0"));
    assert_eq!(r.header("x-user-input-cost"), Some("0.00000015"));
    assert_eq!(r.header("x-user-output-cost"), Some("0.00006"));
    assert_eq!(r.header("x-user-provider"), Some("p"));
    let r = select(&service, "fk", "/auth", "/x", Some("fmt-2"));
    assert_eq!(r.header("x-user-tags"), Some("[]"));
    assert_eq!(r.header("x-user-capabilities"), Some("[]"));
    assert_eq!(r.header("x-user-input-cost"), Some("2"));
    assert_eq!(r.header("x-user-output-cost"), Some("0"));
    assert_eq!(r.header("x-consumer-groups"), Some(""));
    let r = select(&service, "fk", "/auth", "/x", Some("fmt-3"));
    assert_eq!(r.header("x-user-input-cost"), Some("0.00000005"));
    assert_eq!(r.header("x-user-output-cost"), Some("0.0000002"));
}

#[test]
fn logs_never_contain_a_plain_key() {
    let service = Service::bundled_with_env(&[("RUST_LOG", "debug")]);
    service.auth(USER1_KEY, "/midm-base/chat");
    service.auth(USER1_KEY, "/gpt4o/chat");
    service.auth("wrong-secret-key-999", "/x");
    service.get(
        "/auth",
        &[(
            "X-Forwarded-Uri",
            &format!("/midm-base/chat?apikey={ADMIN_KEY}"),
        )],
    );
    service.get(&format!("/auth/midm-base/chat?apikey={ADMIN_KEY}"), &[]);
    std::thread::sleep(Duration::from_millis(200));
    let logs = service.logs();
    assert!(logs.contains("allow"), "debug logging is on: {logs}");
    for key in [USER1_KEY, ADMIN_KEY, "wrong-secret-key-999"] {
        assert!(!logs.contains(key), "plain key in logs:\n{logs}");
    }
}
