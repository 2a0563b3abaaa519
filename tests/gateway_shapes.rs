//! The service against the exact auth requests Traefik (`forwardAuth`, with `forwardBody`), Envoy
//! (`ext_authz` HTTP, with `with_request_body`) and
//! Kong (the `uma-forward-auth` plugin of `deploy/kong/`) send, and the gateway configurations of
//! `deploy/` parsed and checked. The gateways themselves are not installed here: each request shape
//! is built from the parsed configuration the way the gateway builds it (STACK.md, "Gateway facts"),
//! and the Kong plugin runs for real under `lua5.1` with Kong's PDK and `resty.http` mocked, its
//! auth call replayed against the real service and the service's answer fed back to it.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

const FORBIDDEN: &str = "You cannot consume this service";
const NO_KEY: &str = "No API key found in request";
const REALM: &str = r#"Key realm="user-metadata-auth""#;

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// A client's call as it reaches the gateway.
struct ClientCall<'a> {
    method: &'a str,
    /// Path and query, as on the request line.
    uri: &'a str,
    host: &'a str,
    headers: &'a [(&'a str, &'a str)],
    /// The client's body (empty: none).
    body: &'a [u8],
}

impl<'a> ClientCall<'a> {
    fn post(uri: &'a str, headers: &'a [(&'a str, &'a str)]) -> Self {
        ClientCall {
            method: "POST",
            uri,
            host: "llm.example.com",
            headers,
            body: b"",
        }
    }

    fn with_body(self, body: &'a [u8]) -> Self {
        ClientCall { body, ..self }
    }
}

/// One request on a fresh connection, with exactly the given headers (Host included by the caller).
fn send(addr: SocketAddr, method: &str, target: &str, headers: &[(String, String)]) -> Response {
    send_body(addr, method, target, headers, b"")
}

/// The same with a body after the head (the caller's headers say its length).
fn send_body(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Response {
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes, method == "HEAD")
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// An allowed answer: exactly 200 (Envoy denies on 202/204), empty body, all twelve headers once.
fn assert_allowed(r: &Response) {
    assert_eq!(r.status, 200, "an allow must be exactly 200: {r:?}");
    assert!(r.body.is_empty(), "allow body must be empty: {r:?}");
    assert_eq!(r.header("content-length"), Some("0"), "{r:?}");
    for name in METADATA_HEADERS {
        assert_eq!(r.header_count(name), 1, "{name} must be sent once: {r:?}");
    }
}

fn assert_user1_midm(r: &Response) {
    assert_allowed(r);
    for (name, value) in METADATA_HEADERS.iter().zip(USER1_MIDM) {
        assert_eq!(r.header(name), Some(value), "{name}");
    }
}

fn assert_denied(r: &Response, status: u16, message: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.json()["message"], message, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    for name in METADATA_HEADERS {
        assert_eq!(r.header(name), None, "{name} on a deny: {r:?}");
    }
    if status == 401 {
        assert_eq!(r.header("www-authenticate"), Some(REALM), "{r:?}");
    }
}

fn lower(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_ascii_lowercase()).collect()
}

fn deploy_path(relative: &str) -> PathBuf {
    manifest_dir().join("deploy").join(relative)
}

fn read_deploy(relative: &str) -> String {
    let path = deploy_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(relative: &str) -> Value {
    serde_saphyr::from_str::<Value>(&read_deploy(relative))
        .unwrap_or_else(|e| panic!("deploy/{relative} is not valid YAML: {e}"))
}

fn yaml_documents(relative: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read_deploy(relative))
        .unwrap_or_else(|e| panic!("deploy/{relative} is not valid YAML: {e}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_owned()
        })
        .collect()
}

fn array(value: &Value) -> &[Value] {
    value
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("not a list: {value}"))
}

/// `http://host:port/path?query` → (scheme, host, port, `/path?query`).
fn split_url(url: &str) -> (String, String, u16, String) {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("not a URL: {url}"));
    let (authority, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().expect("port")),
        None => (authority, if scheme == "https" { 443 } else { 80 }),
    };
    (scheme.to_owned(), host.to_owned(), port, target.to_owned())
}

/// Envoy duration (`0.25s`) in milliseconds.
fn duration_ms(text: &str) -> f64 {
    let seconds: f64 = text
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a duration: {text}"));
    seconds * 1000.0
}

const RATE_LIMITED: &str = "API rate limit exceeded";

/// `capped` (key `capped-key`), whose only entry `capped-entry` allows three calls a day, and
/// `free` (key `free-key`), whose entry has no limits.
fn limited_seed() -> String {
    let capped = metadata_plugin(&[("capped-entry", "p1")]).replace(
        "              input_cost_per_token:",
        "              limits: {requests_per_day: 3}\n              input_cost_per_token:",
    );
    assert!(capped.contains("requests_per_day"));
    format!(
        "consumers:\n  - username: capped\n    keyauth_credentials: [{{key: capped-key}}]\n{capped}  - username: free\n    keyauth_credentials: [{{key: free-key}}]\n{}",
        metadata_plugin(&[("free-entry", "p2")])
    )
}

/// Tests that count a whole UTC day (the default `tdl.timezone`) must not straddle its end.
fn away_from_midnight() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 86_400 - now % 86_400;
    if left < 90 {
        std::thread::sleep(std::time::Duration::from_secs(left + 1));
    }
}

/// `r` of the `day` member of a RateLimit field (`"day";r=2;t=4711`).
fn day_remaining(field: &str) -> u64 {
    field
        .strip_prefix("\"day\";r=")
        .and_then(|rest| rest.split(';').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("not a day RateLimit: {field}"))
}

/// The service's 429 for `capped` once its quota is used: the status, body and headers a gateway
/// that passes denials on gives the client.
fn assert_rate_limited(r: &Response) {
    assert_denied(r, 429, RATE_LIMITED);
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After must be an integer: {r:?}"));
    assert!((1..=86_400).contains(&retry_after), "{r:?}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""day";q=3;w=86400"#),
        "{r:?}"
    );
    assert_eq!(day_remaining(r.header("ratelimit").expect("RateLimit")), 0);
}

// ---------------------------------------------------------------------------------------------
// Traefik forwardAuth
// ---------------------------------------------------------------------------------------------

/// What `deploy/traefik/dynamic.yml` makes Traefik send for a protected router.
struct Traefik {
    /// Path and query of the forwardAuth `address`.
    target: String,
    /// `authRequestHeaders`: the only client headers forwarded (all when empty).
    request_headers: Vec<String>,
    /// Headers removed by the `headers` middlewares that run before forwardAuth.
    stripped: BTreeSet<String>,
    /// `forwardBody`: the client's body goes along with the GET.
    forward_body: bool,
}

/// The middlewares a router runs, in order, with `chain` middlewares expanded.
fn expand_chain(middlewares: &Value, names: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        let chain = &middlewares[name.as_str()]["chain"]["middlewares"];
        if chain.is_array() {
            out.extend(expand_chain(middlewares, &strings(chain)));
        } else {
            assert!(
                middlewares[name.as_str()].is_object(),
                "router uses unknown middleware {name}"
            );
            out.push(name.clone());
        }
    }
    out
}

/// Headers a Traefik `headers` middleware removes (customRequestHeaders with an empty value).
fn removed_headers(middleware: &Value) -> BTreeSet<String> {
    let custom = &middleware["headers"]["customRequestHeaders"];
    custom
        .as_object()
        .map(|map| {
            map.iter()
                .filter(|(_, v)| v.as_str() == Some(""))
                .map(|(k, _)| k.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

impl Traefik {
    fn load() -> Traefik {
        let doc = yaml("traefik/dynamic.yml");
        let middlewares = &doc["http"]["middlewares"];
        let router = &doc["http"]["routers"]["openai-api_gpt4o-chat"];
        let chain = expand_chain(middlewares, &strings(&router["middlewares"]));
        let auth = chain
            .iter()
            .position(|m| middlewares[m.as_str()]["forwardAuth"].is_object())
            .expect("a forwardAuth middleware on the gpt4o router");
        let forward_auth = &middlewares[chain[auth].as_str()]["forwardAuth"];
        let (_, _, _, target) = split_url(forward_auth["address"].as_str().expect("address"));
        let stripped = chain[..auth]
            .iter()
            .flat_map(|m| removed_headers(&middlewares[m.as_str()]))
            .collect();
        Traefik {
            target,
            request_headers: strings(&forward_auth["authRequestHeaders"]),
            stripped,
            forward_body: forward_auth["forwardBody"] == Value::Bool(true),
        }
    }

    /// The auth request forwardAuth makes for a client call: GET to `address`, the client's headers
    /// filtered, and `X-Forwarded-*` set from the real request (`trustForwardHeader: false`).
    fn send(&self, service: &Service, call: &ClientCall) -> Response {
        let forwarded = [
            ("X-Forwarded-Method", call.method),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", call.host),
            ("X-Forwarded-Uri", call.uri),
            ("X-Forwarded-For", "203.0.113.7"),
        ];
        let mut headers = vec![
            ("Host".to_owned(), service.addr.to_string()),
            ("User-Agent".to_owned(), "Go-http-client/1.1".to_owned()),
            ("Accept-Encoding".to_owned(), "gzip".to_owned()),
        ];
        for (name, value) in call.headers {
            let lower = name.to_ascii_lowercase();
            let allowed = self.request_headers.is_empty()
                || self
                    .request_headers
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name));
            let overwritten = forwarded.iter().any(|(f, _)| f.eq_ignore_ascii_case(name));
            if allowed && !overwritten && !self.stripped.contains(&lower) {
                headers.push(((*name).to_owned(), (*value).to_owned()));
            }
        }
        headers.extend(owned(&forwarded));
        // forwardBody: the body with the client's Content-Length (Go sends none for an empty one).
        let body = if self.forward_body { call.body } else { b"" };
        if !body.is_empty() {
            headers.push(("Content-Length".to_owned(), body.len().to_string()));
        }
        send_body(service.addr, "GET", &self.target, &headers, body)
    }
}

#[test]
fn traefik_shape_allows_user1_on_midm_with_all_twelve_headers() {
    let service = Service::bundled();
    let traefik = Traefik::load();
    let headers = [("apikey", USER1_KEY), ("Content-Type", "application/json")];
    let r = traefik.send(&service, &ClientCall::post("/midm-base/chat", &headers));
    assert_user1_midm(&r);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // The other key headers work the same way through authRequestHeaders.
    let bearer = format!("Bearer {USER1_KEY}");
    for key_header in [("X-Api-Key", USER1_KEY), ("Authorization", bearer.as_str())] {
        let r = traefik.send(
            &service,
            &ClientCall::post("/midm-base/chat", &[key_header]),
        );
        assert_user1_midm(&r);
    }
}

#[test]
fn traefik_shape_acl_refuses_user1_on_gpt4o_and_admin_gets_the_pinned_entry() {
    let service = Service::bundled();
    let traefik = Traefik::load();
    // Traefik returns this answer (status, headers, body) to the client as it is.
    let r = traefik.send(
        &service,
        &ClientCall::post("/gpt4o/chat", &[("apikey", USER1_KEY)]),
    );
    assert_denied(&r, 403, FORBIDDEN);
    let r = traefik.send(
        &service,
        &ClientCall::post("/gpt4o/chat", &[("apikey", ADMIN_KEY)]),
    );
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"));
    assert_eq!(r.header("x-consumer-username"), Some("admin-client"));
    let r = traefik.send(&service, &ClientCall::post("/gpt4o/chat", &[]));
    assert_denied(&r, 401, NO_KEY);
}

#[test]
fn traefik_shape_key_in_the_query_travels_inside_x_forwarded_uri() {
    let service = Service::bundled();
    let traefik = Traefik::load();
    let uri = format!("/midm-base/chat?stream=true&apikey={USER1_KEY}");
    let r = traefik.send(&service, &ClientCall::post(&uri, &[]));
    assert_user1_midm(&r);
    let uri = format!("/gpt4o/chat?apikey={USER1_KEY}");
    let r = traefik.send(&service, &ClientCall::post(&uri, &[]));
    assert_denied(&r, 403, FORBIDDEN);
}

#[test]
fn traefik_shape_client_forwarded_headers_cannot_move_the_decision() {
    let service = Service::bundled();
    let traefik = Traefik::load();
    // The client claims to call /midm-base/chat while it calls /gpt4o/chat. With
    // `trustForwardHeader: false` Traefik overwrites X-Forwarded-Uri/Method with the real ones.
    let spoof = [
        ("apikey", USER1_KEY),
        ("X-Forwarded-Uri", "/midm-base/chat"),
        ("X-Forwarded-Method", "GET"),
        ("X-Original-URI", "/midm-base/chat"),
    ];
    let r = traefik.send(&service, &ClientCall::post("/gpt4o/chat", &spoof));
    assert_denied(&r, 403, FORBIDDEN);
    // Why the setting matters: the service believes X-Forwarded-Uri, since that is how a
    // gateway describes the call. Had Traefik passed the client's copy, user1 would get in.
    let believed = service.get(
        "/auth",
        &[
            ("apikey", USER1_KEY),
            ("X-Forwarded-Uri", "/midm-base/chat"),
        ],
    );
    assert_user1_midm(&believed);
}

#[test]
fn traefik_shape_client_metadata_id_is_stripped_before_it_could_choose_the_entry() {
    // By default the service ignores X-Metadata-Id altogether (SPEC §4: selectors are opt-in).
    let ignoring = Service::bundled();
    let r = ignoring.get(
        "/auth",
        &[
            ("apikey", ADMIN_KEY),
            ("X-Forwarded-Uri", "/other"),
            ("X-Metadata-Id", "azure-gpt4o"),
        ],
    );
    assert_eq!(r.header("x-consumer-id"), Some("kt-midm-base"), "{r:?}");
    let service = Service::bundled_with_env(&[("UMA_AUTH__ENTRY_SELECTORS", "header")]);
    let traefik = Traefik::load();
    // What a service that honours X-Metadata-Id does with a client's copy when it reaches it (SPEC
    // §4 rule 3): on an unpinned path it chooses among the consumer's own entries...
    let direct = |key: &str, uri: &str, id: &str| {
        service.get(
            "/auth",
            &[
                ("apikey", key),
                ("X-Forwarded-Uri", uri),
                ("X-Metadata-Id", id),
            ],
        )
    };
    let r = direct(ADMIN_KEY, "/other", "azure-gpt4o");
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"));
    // ...an id outside the consumer's list is refused...
    assert_denied(&direct(USER1_KEY, "/other", "azure-gpt4o"), 403, FORBIDDEN);
    // ...and a config-route pin (the bundled /midm-base and /gpt4o) beats it.
    let r = direct(ADMIN_KEY, "/midm-base/chat", "azure-gpt4o");
    assert_eq!(r.header("x-consumer-id"), Some("kt-midm-base"), "{r:?}");
    // So dynamic.yml must keep it from the service: the header middleware before forwardAuth
    // removes it, and authRequestHeaders would not forward it anyway.
    assert!(traefik.stripped.contains("x-metadata-id"));
    assert!(
        !traefik
            .request_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("x-metadata-id"))
    );
    let headers = [("apikey", ADMIN_KEY), ("X-Metadata-Id", "azure-gpt4o")];
    let r = traefik.send(&service, &ClientCall::post("/other", &headers));
    assert_allowed(&r);
    assert_eq!(
        r.header("x-consumer-id"),
        Some("kt-midm-base"),
        "the first entry, not the client's choice"
    );
    // A user1 call with a foreign id is therefore still allowed with its own entry.
    let headers = [("apikey", USER1_KEY), ("X-Metadata-Id", "azure-gpt4o")];
    let r = traefik.send(&service, &ClientCall::post("/midm-base/chat", &headers));
    assert_user1_midm(&r);
}

#[test]
fn traefik_shape_forwards_the_body_and_the_service_checks_its_tokens() {
    let service = Service::bundled();
    let traefik = Traefik::load();
    assert!(
        traefik.forward_body,
        "the LLM routers' forwardAuth must forward the body"
    );
    assert_eq!(traefik.target, "/auth-body");
    let headers = [("apikey", USER1_KEY), ("Content-Type", "application/json")];
    let call = |body: &'static [u8]| {
        traefik.send(
            &service,
            &ClientCall::post("/midm-base/chat", &headers).with_body(body),
        )
    };
    let chat = br#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hello world"}]}"#;
    let r = call(chat);
    assert_user1_midm(&r);
    assert_eq!(r.header("x-user-input-tokens"), Some("2"));
    // Refusals reach the client as the service wrote them (forwardAuth copies any non-2xx).
    assert_denied(
        &call(br#"{"max_tokens":30000}"#),
        403,
        "Requested output tokens exceed the limit of 20000",
    );
    assert_denied(&call(b"{\"model\":"), 400, "Request body is not valid JSON");
    // A key problem wins over the body's.
    let no_key = [("Content-Type", "application/json")];
    let r = traefik.send(
        &service,
        &ClientCall::post("/midm-base/chat", &no_key).with_body(b"{bad"),
    );
    assert_denied(&r, 401, NO_KEY);
    // A call without a body (a GET through the same router) has nothing to inspect.
    let get = ClientCall {
        method: "GET",
        ..ClientCall::post("/midm-base/chat", &headers)
    };
    assert_eq!(
        traefik.send(&service, &get).header("x-user-input-tokens"),
        Some("0")
    );
}

#[test]
fn traefik_shape_429_goes_back_with_retry_after_and_the_ratelimit_fields() {
    away_from_midnight();
    let service = Service::with_files("", &limited_seed());
    let traefik = Traefik::load();
    let call = ClientCall::post("/v1/chat", &[("apikey", "capped-key")]);
    for left in (0..3).rev() {
        let r = traefik.send(&service, &call);
        assert_allowed(&r);
        assert_eq!(r.header("x-consumer-id"), Some("capped-entry"));
        // The 200 has the fields, but Traefik copies only authResponseHeaders, onto the upstream
        // request, and adds nothing of a 2xx answer to the client's response.
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""day";q=3;w=86400"#),
            "{r:?}"
        );
        assert_eq!(
            day_remaining(r.header("ratelimit").expect("RateLimit")),
            left
        );
    }
    // Any other answer goes back to the client as it is: status, body and every header.
    assert_rate_limited(&traefik.send(&service, &call));
    // The RateLimit fields are not upstream headers: authResponseHeaders does not name them.
    let doc = yaml("traefik/dynamic.yml");
    let copied =
        strings(&doc["http"]["middlewares"]["uma-auth"]["forwardAuth"]["authResponseHeaders"]);
    for name in ["RateLimit", "RateLimit-Policy", "Retry-After"] {
        assert!(
            !copied.iter().any(|h| h.eq_ignore_ascii_case(name)),
            "{name} would go upstream"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy ext_authz (HTTP service)
// ---------------------------------------------------------------------------------------------

/// What `deploy/envoy/envoy.yaml` makes ext_authz send.
struct Envoy {
    path_prefix: String,
    /// `allowed_headers` exact patterns (lower-case), plus `authorization`, always sent.
    allowed: BTreeSet<String>,
    /// `allowed_upstream_headers`: copied from a 200 onto the upstream request.
    upstream: BTreeSet<String>,
    /// `allowed_client_headers`: kept on a denial's answer to the client.
    client_on_deny: BTreeSet<String>,
    /// `allowed_client_headers_on_success`: added from a 200 to the client's response.
    client_on_success: BTreeSet<String>,
    /// `with_request_body`: the client's body goes along.
    with_body: bool,
}

/// Headers ext_authz keeps on a denial's answer to the client whatever `allowed_client_headers`
/// lists (ext_authz.proto: Path, Status, Content-Length, WWWAuthenticate and Location).
const ENVOY_DENY_ALWAYS: [&str; 5] = [
    ":path",
    ":status",
    "content-length",
    "www-authenticate",
    "location",
];

fn http_connection_manager(doc: &Value) -> &Value {
    for listener in array(&doc["static_resources"]["listeners"]) {
        for chain in array(&listener["filter_chains"]) {
            for filter in array(&chain["filters"]) {
                if filter["name"] == "envoy.filters.network.http_connection_manager" {
                    return &filter["typed_config"];
                }
            }
        }
    }
    panic!("no http_connection_manager in envoy.yaml");
}

fn http_filter<'a>(hcm: &'a Value, name: &str) -> &'a Value {
    array(&hcm["http_filters"])
        .iter()
        .find(|f| f["name"] == name)
        .map(|f| &f["typed_config"])
        .unwrap_or_else(|| panic!("no {name} filter"))
}

/// The `exact` values of a ListStringMatcher; any other kind of pattern fails the test.
fn exact_patterns(matcher: &Value) -> BTreeSet<String> {
    array(&matcher["patterns"])
        .iter()
        .map(|p| {
            let map = p.as_object().expect("pattern");
            assert_eq!(map.len(), 1, "only plain exact patterns: {p}");
            let exact = p["exact"]
                .as_str()
                .unwrap_or_else(|| panic!("only exact patterns: {p}"));
            assert_eq!(
                exact,
                exact.to_ascii_lowercase(),
                "Envoy header names are lower-case"
            );
            exact.to_owned()
        })
        .collect()
}

impl Envoy {
    fn load() -> Envoy {
        let doc = yaml("envoy/envoy.yaml");
        let ext_authz = http_filter(
            http_connection_manager(&doc),
            "envoy.filters.http.ext_authz",
        );
        let service = &ext_authz["http_service"];
        let mut allowed = exact_patterns(&service["authorization_request"]["allowed_headers"]);
        allowed.insert("authorization".to_owned());
        let response = &service["authorization_response"];
        Envoy {
            path_prefix: service["path_prefix"]
                .as_str()
                .expect("path_prefix")
                .to_owned(),
            allowed,
            upstream: exact_patterns(&response["allowed_upstream_headers"]),
            client_on_deny: exact_patterns(&response["allowed_client_headers"]),
            client_on_success: exact_patterns(&response["allowed_client_headers_on_success"]),
            with_body: ext_authz["with_request_body"].is_object(),
        }
    }

    /// What of the service's answer reaches the client: on a 200, the headers Envoy adds to the
    /// client's response (the body is the upstream's); on a denial, the status, the body and the
    /// headers Envoy keeps.
    fn to_client(&self, r: &Response) -> Response {
        let keep = |name: &str| {
            let name = name.to_ascii_lowercase();
            if r.status == 200 {
                self.client_on_success.contains(&name)
            } else {
                self.client_on_deny.contains(&name) || ENVOY_DENY_ALWAYS.contains(&name.as_str())
            }
        };
        Response {
            status: r.status,
            headers: r.headers.iter().filter(|(k, _)| keep(k)).cloned().collect(),
            body: if r.status == 200 {
                String::new()
            } else {
                r.body.clone()
            },
        }
    }

    /// The check request: the client's method, `path_prefix` + original path and query, the
    /// original Host, the body when `with_request_body` is set (else `Content-Length: 0`) and only
    /// the allowed client headers.
    fn send(&self, service: &Service, call: &ClientCall) -> Response {
        let body = if self.with_body { call.body } else { b"" };
        let mut headers = vec![
            ("host".to_owned(), call.host.to_owned()),
            ("content-length".to_owned(), body.len().to_string()),
            ("x-forwarded-proto".to_owned(), "http".to_owned()),
            (
                "x-request-id".to_owned(),
                "5b0e7c2a-93c1-4c59-9d51-1f7f7d0e0a11".to_owned(),
            ),
            (
                "x-envoy-expected-rq-timeout-ms".to_owned(),
                "250".to_owned(),
            ),
        ];
        for (name, value) in call.headers {
            let lower = name.to_ascii_lowercase();
            if self.allowed.contains(&lower) {
                headers.push((lower, (*value).to_owned()));
            }
        }
        let target = format!("{}{}", self.path_prefix, call.uri);
        send_body(service.addr, call.method, &target, &headers, body)
    }
}

#[test]
fn envoy_shape_admin_on_gpt4o_is_allowed_with_exactly_200() {
    let service = Service::bundled();
    let envoy = Envoy::load();
    let call = ClientCall::post("/gpt4o/chat?stream=true", &[("apikey", ADMIN_KEY)]);
    let r = envoy.send(&service, &call);
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"));
    assert_eq!(r.header("x-user-provider"), Some("azure"));
    assert_eq!(
        r.header("x-consumer-groups"),
        Some("openai-allowed, midm-allowed")
    );
    // Every method Envoy may forward gets a decision with exactly 200 (never 202/204).
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"] {
        let call = ClientCall {
            method,
            ..ClientCall::post("/gpt4o/chat", &[("x-api-key", ADMIN_KEY)])
        };
        let r = envoy.send(&service, &call);
        assert_eq!(r.status, 200, "{method}: {r:?}");
        assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"), "{method}");
    }
    let bearer = format!("Bearer {ADMIN_KEY}");
    let headers = [("Authorization", bearer.as_str())];
    let r = envoy.send(&service, &ClientCall::post("/midm-base/chat", &headers));
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("kt-midm-base"));
}

#[test]
fn envoy_shape_user1_is_refused_on_gpt4o_whatever_the_method() {
    let service = Service::bundled();
    let envoy = Envoy::load();
    let r = envoy.send(
        &service,
        &ClientCall::post("/gpt4o/chat?stream=true", &[("apikey", USER1_KEY)]),
    );
    assert_denied(&r, 403, FORBIDDEN);
    // The seed route is POST-only; a GET must not slip past its ACL.
    let call = ClientCall {
        method: "GET",
        ..ClientCall::post("/gpt4o/chat", &[("apikey", USER1_KEY)])
    };
    assert_denied(&envoy.send(&service, &call), 403, FORBIDDEN);
    // Envoy passes the path as the client sent it after its own normalization; the service
    // normalizes again, so dot segments cannot reach another route's ACL.
    let r = envoy.send(
        &service,
        &ClientCall::post("/midm-base/../gpt4o/chat", &[("apikey", USER1_KEY)]),
    );
    assert_denied(&r, 403, FORBIDDEN);
    let r = envoy.send(
        &service,
        &ClientCall::post("/midm-base/chat?stream=true", &[("apikey", USER1_KEY)]),
    );
    assert_user1_midm(&r);
}

#[test]
fn envoy_shape_client_query_and_headers_cannot_choose_the_entry() {
    let service = Service::bundled();
    let envoy = Envoy::load();
    // Envoy appends the client's query to the auth path: on /auth/<path> it is the original
    // query, never selection rule 2. On a pinned route the pin holds...
    let call = ClientCall::post(
        "/gpt4o/chat?metadata_id=kt-midm-base",
        &[("apikey", ADMIN_KEY)],
    );
    let r = envoy.send(&service, &call);
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"));
    // ...and on an unpinned path the consumer's first entry applies, not the client's choice.
    let call = ClientCall::post("/other?metadata_id=azure-gpt4o", &[("apikey", ADMIN_KEY)]);
    let r = envoy.send(&service, &call);
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("kt-midm-base"));
    // X-Metadata-Id is not in allowed_headers, so it never reaches the service.
    assert!(!envoy.allowed.contains("x-metadata-id"));
    let call = ClientCall::post(
        "/other",
        &[("apikey", ADMIN_KEY), ("X-Metadata-Id", "azure-gpt4o")],
    );
    let r = envoy.send(&service, &call);
    assert_eq!(r.header("x-consumer-id"), Some("kt-midm-base"), "{r:?}");
    // Nor do a client's X-Forwarded-Uri/X-Original-URI; they would lose to the path anyway.
    let call = ClientCall::post(
        "/gpt4o/chat",
        &[
            ("apikey", USER1_KEY),
            ("X-Forwarded-Uri", "/midm-base/chat"),
            ("X-Original-URI", "/midm-base/chat"),
        ],
    );
    assert_denied(&envoy.send(&service, &call), 403, FORBIDDEN);
}

#[test]
fn envoy_shape_no_key_is_401_with_www_authenticate() {
    let service = Service::bundled();
    let envoy = Envoy::load();
    let r = envoy.send(&service, &ClientCall::post("/gpt4o/chat?stream=true", &[]));
    assert_denied(&r, 401, NO_KEY);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = envoy.send(
        &service,
        &ClientCall::post("/gpt4o/chat", &[("apikey", "not-a-key")]),
    );
    assert_denied(&r, 401, "Invalid authentication credentials");
    // A key in the client's query works, since the query is part of the auth path.
    let uri = format!("/midm-base/chat?apikey={USER1_KEY}");
    let r = envoy.send(&service, &ClientCall::post(&uri, &[]));
    assert_user1_midm(&r);
}

#[test]
fn envoy_shape_sends_the_body_to_auth_body_and_relays_its_refusals() {
    let service = Service::bundled();
    let envoy = Envoy::load();
    assert!(envoy.with_body);
    assert_eq!(envoy.path_prefix, "/auth-body");
    assert!(envoy.upstream.contains("x-user-input-tokens"));
    let headers = [("apikey", USER1_KEY), ("content-type", "application/json")];
    let call = |body: &[u8]| {
        envoy.send(
            &service,
            &ClientCall::post("/midm-base/chat", &headers).with_body(body),
        )
    };
    let chat = br#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hello world"}]}"#;
    let r = call(chat);
    assert_user1_midm(&r);
    assert_eq!(r.header("x-user-input-tokens"), Some("2"));
    // 413 with the count: Envoy passes a denial's status and body to the client.
    let long = format!(
        r#"{{"messages":[{{"role":"user","content":"{}hello"}}]}}"#,
        "hello ".repeat(50_000)
    );
    let r = envoy.to_client(&call(long.as_bytes()));
    assert_denied(&r, 413, "Input of 50001 tokens exceeds the limit of 50000");
    let r = envoy.to_client(&call(br#"{"max_completion_tokens":20001}"#));
    assert_denied(&r, 403, "Requested output tokens exceed the limit of 20000");
    // Other methods keep working, with or without a body.
    let get = ClientCall {
        method: "GET",
        ..ClientCall::post("/midm-base/chat", &headers)
    };
    assert_eq!(
        envoy.send(&service, &get).header("x-user-input-tokens"),
        Some("0")
    );
}

#[test]
fn envoy_shape_ratelimit_fields_reach_the_client_on_200_and_on_429() {
    away_from_midnight();
    let service = Service::with_files("", &limited_seed());
    let envoy = Envoy::load();
    let call = ClientCall::post("/v1/chat?stream=true", &[("apikey", "capped-key")]);
    let fields = lower(&["RateLimit-Policy", "RateLimit"]);
    for left in (0..3).rev() {
        let r = envoy.send(&service, &call);
        assert_allowed(&r);
        // allowed_client_headers_on_success puts exactly the two fields on the client's response...
        let client = envoy.to_client(&r);
        let names: BTreeSet<String> = client
            .headers
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        assert_eq!(names, fields, "{r:?}");
        assert_eq!(
            client.header("ratelimit-policy"),
            Some(r#""day";q=3;w=86400"#)
        );
        assert_eq!(
            day_remaining(client.header("ratelimit").expect("RateLimit")),
            left
        );
        // ...and allowed_upstream_headers keeps them from the upstream request.
        assert!(envoy.upstream.is_disjoint(&fields));
        assert!(!envoy.upstream.contains("retry-after"));
    }
    // The 429: status, JSON body, Retry-After and both fields reach the client.
    let r = envoy.send(&service, &call);
    assert_eq!(r.status, 429, "{r:?}");
    assert_rate_limited(&envoy.to_client(&r));
    // An entry without limits: nothing is added to the client's response.
    let r = envoy.send(
        &service,
        &ClientCall::post("/v1/chat", &[("apikey", "free-key")]),
    );
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("free-entry"));
    assert!(envoy.to_client(&r).headers.is_empty(), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Kong uma-forward-auth plugin
// ---------------------------------------------------------------------------------------------

/// The request the plugin makes: GET /auth, X-Original-URI with the query, X-Original-Method and
/// the client's key headers (lua-resty-http adds Host and User-Agent).
fn kong_shape(service: &Service, method: &str, uri: &str, keys: &[(&str, &str)]) -> Response {
    let mut headers = vec![
        ("Host".to_owned(), service.addr.to_string()),
        (
            "User-Agent".to_owned(),
            "lua-resty-http/0.17.2 (Lua) ngx_lua/10026".to_owned(),
        ),
        ("X-Original-URI".to_owned(), uri.to_owned()),
        ("X-Original-Method".to_owned(), method.to_owned()),
    ];
    headers.extend(owned(keys));
    send(service.addr, "GET", "/auth", &headers)
}

#[test]
fn kong_shape_allows_and_refuses_as_the_seed_document_says() {
    let service = Service::bundled();
    let r = kong_shape(
        &service,
        "POST",
        "/midm-base/chat?stream=true",
        &[("apikey", USER1_KEY)],
    );
    assert_user1_midm(&r);
    let r = kong_shape(&service, "POST", "/gpt4o/chat", &[("apikey", USER1_KEY)]);
    assert_denied(&r, 403, FORBIDDEN);
    let r = kong_shape(&service, "POST", "/gpt4o/chat", &[("apikey", ADMIN_KEY)]);
    assert_allowed(&r);
    assert_eq!(r.header("x-consumer-id"), Some("azure-gpt4o"));
    let uri = format!("/midm-base/chat?apikey={USER1_KEY}");
    assert_user1_midm(&kong_shape(&service, "POST", &uri, &[]));
    let r = kong_shape(&service, "POST", "/midm-base/chat", &[]);
    assert_denied(&r, 401, NO_KEY);
    // The seed route is POST-only; X-Original-Method GET still gets the route's ACL.
    let r = kong_shape(&service, "GET", "/gpt4o/chat", &[("apikey", USER1_KEY)]);
    assert_denied(&r, 403, FORBIDDEN);
}

/// A Lua 5.1 tool, or a failed test that says how to get it.
fn lua_tool(name: &str) -> String {
    match Command::new(name).arg("-v").output() {
        Ok(_) => name.to_owned(),
        Err(e) => panic!(
            "{name} is not available ({e}): install lua5.1 (Debian package `lua5.1`; scripts/test.sh installs it)"
        ),
    }
}

fn plugin_dir() -> PathBuf {
    deploy_path("kong/kong/plugins/uma-forward-auth")
}

/// A Lua string literal for any bytes.
fn lua_str(text: &str) -> String {
    let mut out = String::from("\"");
    for byte in text.bytes() {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(byte as char);
            }
            0x20..=0x7e => out.push(byte as char),
            _ => out.push_str(&format!("\\{byte:03}")),
        }
    }
    out.push('"');
    out
}

fn lua_pairs(pairs: &[(String, String)]) -> String {
    let items: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{{{}, {}}}", lua_str(k), lua_str(v)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Runs the plugin's access phase, then its header_filter phase (Kong runs it on every response),
/// under lua5.1 with Kong's PDK, `ngx` and `resty.http` mocked,
/// and the plugin's schema defaults as its configuration (plus `conf`, Lua table fields).
const LUA_HARNESS: &str = r##"
local PLUGIN_DIR = __PLUGIN_DIR__
local CLIENT = __CLIENT__
local RESPONSE = __RESPONSE__
local CONF = __CONF__
PHASE = "init"

local function emit(...)
  local parts = {}
  for i = 1, select("#", ...) do
    local s = tostring((select(i, ...)))
    assert(not s:find("[\t\r\n]"), "control character in output: " .. s)
    parts[#parts + 1] = s
  end
  io.write(table.concat(parts, "\t"), "\n")
end

-- Header tables as ngx.req.get_headers() and lua-resty-http build them: lower-case keys,
-- case-insensitive lookup, a list of values for a repeated header.
local function header_table(list)
  local t = {}
  for _, pair in ipairs(list) do
    local k, v = pair[1]:lower(), pair[2]
    local old = rawget(t, k)
    if old == nil then
      t[k] = v
    elseif type(old) == "table" then
      old[#old + 1] = v
    else
      t[k] = { old, v }
    end
  end
  return setmetatable(t, { __index = function(tbl, k)
    if type(k) == "string" then return rawget(tbl, k:lower()) end
  end })
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function emit_headers(tag, t)
  for _, k in ipairs(sorted_keys(t)) do
    local v = t[k]
    if type(v) == "table" then
      for _, x in ipairs(v) do emit(tag, k, x) end
    else
      emit(tag, k, v)
    end
  end
end

local client_query = {}
local raw_query = CLIENT.uri:match("%?(.*)$")
if raw_query then
  for pair in raw_query:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    if k == nil then k, v = pair, true end
    client_query[k] = v
  end
end

package.preload["resty.http"] = function()
  return {
    new = function()
      local client = {}
      function client:set_timeout(ms) emit("TIMEOUT", ms) end
      function client:set_timeouts(c, s, r) emit("TIMEOUT", c .. "," .. s .. "," .. r) end
      function client:request_uri(url, params)
        emit("CALL", params.method or "GET", url)
        emit_headers("SEND", params.headers or {})
        emit("KEEPALIVE", tostring(params.keepalive_timeout), tostring(params.keepalive_pool))
        if RESPONSE == nil then return nil, "connection refused" end
        return {
          status = RESPONSE.status,
          headers = header_table(RESPONSE.headers),
          body = RESPONSE.body,
        }
      end
      return client
    end,
  }
end

package.preload["kong.db.schema.typedefs"] = function()
  return setmetatable({}, { __index = function(_, name)
    return setmetatable({ typedef = name }, { __call = function(_, overrides)
      local t = { typedef = name }
      for k, v in pairs(overrides or {}) do t[k] = v end
      return t
    end })
  end })
end

ngx = {
  var = { request_uri = CLIENT.uri },
  escape_uri = function(s)
    return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
  end,
}

local function log(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  emit("LOG", table.concat(parts))
end

kong = {
  request = {
    get_method = function() return CLIENT.method end,
    get_host = function() return "kong.example" end,
    get_headers = function() return header_table(CLIENT.headers) end,
    get_header = function(name)
      local v = header_table(CLIENT.headers)[name]
      if type(v) == "table" then return v[1] end
      return v
    end,
    get_query = function()
      local copy = {}
      for k, v in pairs(client_query) do copy[k] = v end
      return copy
    end,
  },
  service = {
    request = {
      set_header = function(name, value) emit("UPSTREAM_SET", name, value) end,
      clear_header = function(name) emit("UPSTREAM_CLEAR", name) end,
      set_query = function(args)
        local parts = {}
        for _, k in ipairs(sorted_keys(args)) do
          local v = args[k]
          if v == true then parts[#parts + 1] = k else parts[#parts + 1] = k .. "=" .. v end
        end
        emit("UPSTREAM_QUERY", table.concat(parts, "&"))
      end,
    },
  },
  ctx = { plugin = {} },
  response = {
    set_header = function(name, value)
      assert(PHASE == "rewrite" or PHASE == "access" or PHASE == "header_filter",
        "kong.response.set_header in phase " .. PHASE)
      emit("CLIENT_SET", name, value)
    end,
    exit = function(status, body, headers)
      emit("EXIT", status)
      emit_headers("EXIT_HEADER", headers or {})
      emit("EXIT_BODY", body or "")
      return "exit"
    end,
  },
  log = { err = log, warn = log, notice = log, info = log, debug = log },
}

local schema = dofile(PLUGIN_DIR .. "/schema.lua")
emit("SCHEMA", schema.name)
local conf = {}
for _, field in ipairs(schema.fields) do
  local name, def = next(field)
  if name == "config" then
    for _, config_field in ipairs(def.fields) do
      local key, spec = next(config_field)
      conf[key] = spec.default
      emit("DEFAULT", key, tostring(spec.default))
    end
  end
end
for k, v in pairs(CONF) do conf[k] = v end

local handler = dofile(PLUGIN_DIR .. "/handler.lua")
emit("PRIORITY", handler.PRIORITY)
PHASE = "access"
local result = handler:access(conf)
emit("RESULT", tostring(result))
-- Kong runs header_filter on every response, the plugin's own exits included.
if handler.header_filter then
  PHASE = "header_filter"
  emit("PHASE", PHASE)
  handler:header_filter(conf)
end
"##;

/// What the plugin did, one tab-separated line per action.
struct PluginRun {
    lines: Vec<Vec<String>>,
}

impl PluginRun {
    fn tagged(&self, tag: &str) -> Vec<&[String]> {
        self.lines
            .iter()
            .filter(|l| l[0] == tag)
            .map(|l| &l[1..])
            .collect()
    }

    fn pairs(&self, tag: &str) -> Vec<(String, String)> {
        self.tagged(tag)
            .iter()
            .map(|l| (l[0].clone(), l[1].clone()))
            .collect()
    }

    fn values(&self, tag: &str) -> Vec<String> {
        self.tagged(tag).iter().map(|l| l[0].clone()).collect()
    }

    fn position(&self, tag: &str, value: &str) -> Option<usize> {
        self.lines
            .iter()
            .position(|l| l[0] == tag && l.get(1).map(String::as_str) == Some(value))
    }

    /// The exit status, when the plugin answered the client itself.
    fn exit(&self) -> Option<u16> {
        self.values("EXIT")
            .first()
            .map(|s| s.parse().expect("status"))
    }

    fn dump(&self) -> String {
        self.lines
            .iter()
            .map(|l| l.join(" | "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct KongCall<'a> {
    method: &'a str,
    uri: &'a str,
    headers: &'a [(&'a str, &'a str)],
    /// Extra plugin configuration, as Lua table fields.
    conf: &'a str,
}

fn run_plugin(service: &Service, call: &KongCall, answer: Option<&Response>) -> PluginRun {
    let lua = lua_tool("lua5.1");
    let client = format!(
        "{{ method = {}, uri = {}, headers = {} }}",
        lua_str(call.method),
        lua_str(call.uri),
        lua_pairs(&owned(call.headers))
    );
    let response = match answer {
        None => "nil".to_owned(),
        Some(r) => format!(
            "{{ status = {}, headers = {}, body = {} }}",
            r.status,
            lua_pairs(&r.headers),
            lua_str(&r.body)
        ),
    };
    let conf = format!(
        "{{ auth_url = {}, {} }}",
        lua_str(&format!("http://{}/auth", service.addr)),
        call.conf
    );
    let script = LUA_HARNESS
        .replace(
            "__PLUGIN_DIR__",
            &lua_str(&plugin_dir().display().to_string()),
        )
        .replace("__CLIENT__", &client)
        .replace("__RESPONSE__", &response)
        .replace("__CONF__", &conf);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("harness.lua");
    std::fs::write(&path, script).expect("write harness");
    let output = Command::new(lua).arg(&path).output().expect("run lua5.1");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        output.status.success(),
        "the plugin failed under lua5.1:\n{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    PluginRun {
        lines: stdout
            .lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect(),
    }
}

/// Runs the plugin once with the service unreachable (which also records the request it makes),
/// replays that request against the real service, then runs it again with the service's answer.
/// The plugin ends the call with the service's 429 as it is: status, body, `Retry-After`, the
/// RateLimit fields, content type and caching.
fn assert_kong_relays_429(refused: &PluginRun, answer: &Response) {
    assert_eq!(refused.exit(), Some(429), "{}", refused.dump());
    assert_eq!(refused.values("EXIT_BODY"), [answer.body.as_str()]);
    let exit_headers = refused.pairs("EXIT_HEADER");
    for name in [
        "Retry-After",
        "RateLimit-Policy",
        "RateLimit",
        "Content-Type",
        "Cache-Control",
    ] {
        let sent = exit_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        assert!(sent.is_some(), "{name} missing: {}", refused.dump());
        assert_eq!(sent, answer.header(name), "{name}");
    }
}

fn kong_round_trip(service: &Service, call: &KongCall) -> (PluginRun, Response, PluginRun) {
    let unreachable = run_plugin(service, call, None);
    let calls = unreachable.tagged("CALL");
    assert_eq!(calls.len(), 1, "{}", unreachable.dump());
    let (method, url) = (calls[0][0].clone(), calls[0][1].clone());
    let (_, host, port, target) = split_url(&url);
    assert_eq!(
        (host.as_str(), port),
        (service.addr.ip().to_string().as_str(), service.addr.port())
    );
    let mut headers = vec![("Host".to_owned(), format!("{host}:{port}"))];
    headers.extend(unreachable.pairs("SEND"));
    let answer = send(service.addr, &method, &target, &headers);
    let answered = run_plugin(service, call, Some(&answer));
    (unreachable, answer, answered)
}

#[test]
fn kong_plugin_round_trip_against_the_service() {
    // As deploy/kong/README.md runs it: Kong's headers, and the plugin's pin on the auth URL.
    let service = Service::bundled_with_env(&[
        ("UMA_AUTH__ORIGINAL_REQUEST", "original"),
        ("UMA_AUTH__ENTRY_SELECTORS", "query"),
    ]);

    // 1. Allowed: user1 on /midm-base/chat, with forged metadata headers and an X-Metadata-Id.
    let forged = [
        ("apikey", USER1_KEY),
        ("Content-Type", "application/json"),
        ("X-Consumer-ID", "azure-gpt4o"),
        ("X-User-Provider", "forged"),
        ("x-user-provider", "forged-again"),
        ("X-Metadata-Id", "azure-gpt4o"),
    ];
    let call = KongCall {
        method: "POST",
        uri: "/midm-base/chat?stream=true",
        headers: &forged,
        conf: "",
    };
    let (unreachable, answer, allowed) = kong_round_trip(&service, &call);
    // Schema defaults, as Kong would fill them in.
    let defaults = unreachable.pairs("DEFAULT");
    for expected in [
        ("auth_url", "http://127.0.0.1:8089/auth"),
        ("timeout", "500"),
        ("hide_credentials", "true"),
    ] {
        assert!(
            defaults.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "default {expected:?} in {defaults:?}"
        );
    }
    assert_eq!(unreachable.values("SCHEMA"), ["uma-forward-auth"]);
    assert_eq!(unreachable.values("TIMEOUT"), ["500"]);
    // The request the plugin makes: exactly the Kong shape, nothing else of the client's.
    let calls = unreachable.tagged("CALL");
    assert_eq!(calls[0][0], "GET");
    let mut sent = unreachable.pairs("SEND");
    sent.sort();
    let mut expected = owned(&[
        ("X-Original-Host", "kong.example"),
        ("X-Original-Method", "POST"),
        ("X-Original-URI", "/midm-base/chat?stream=true"),
        ("apikey", USER1_KEY),
    ]);
    expected.sort();
    assert_eq!(sent, expected, "{}", unreachable.dump());
    // No answer: 503, after the client's metadata headers were cleared.
    assert_eq!(unreachable.exit(), Some(503), "{}", unreachable.dump());
    assert!(
        unreachable
            .pairs("EXIT_HEADER")
            .contains(&("Retry-After".to_owned(), "1".to_owned()))
    );
    // With the service's 200: every client copy cleared first, then the twelve set, as sent.
    assert_user1_midm(&answer);
    assert_eq!(allowed.exit(), None, "{}", allowed.dump());
    let cleared = allowed.values("UPSTREAM_CLEAR");
    let set = allowed.pairs("UPSTREAM_SET");
    assert_eq!(set.len(), 12, "{}", allowed.dump());
    for name in METADATA_HEADERS {
        assert!(cleared.iter().any(|c| c == name), "{name} not cleared");
        let value = set.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(value, answer.header(name), "{name}");
        assert!(
            allowed.position("UPSTREAM_CLEAR", name) < allowed.position("UPSTREAM_SET", name),
            "{name} must be cleared before it is set"
        );
    }
    // hide_credentials (default true): the key headers are removed upstream.
    for name in ["apikey", "x-api-key"] {
        assert!(
            cleared.iter().any(|c| c.eq_ignore_ascii_case(name)),
            "{name} kept upstream: {}",
            allowed.dump()
        );
    }
    assert!(allowed.values("UPSTREAM_QUERY").is_empty());
    // user1's entry has no limits: nothing is added to the client's response.
    assert!(
        allowed.tagged("CLIENT_SET").is_empty(),
        "{}",
        allowed.dump()
    );

    // 2. Refused by the ACL: the service's status, body and headers go to the client.
    let call = KongCall {
        method: "POST",
        uri: "/gpt4o/chat",
        headers: &[("apikey", USER1_KEY)],
        conf: "",
    };
    let (_, answer, refused) = kong_round_trip(&service, &call);
    assert_denied(&answer, 403, FORBIDDEN);
    assert_eq!(refused.exit(), Some(403), "{}", refused.dump());
    assert_eq!(refused.values("EXIT_BODY"), [answer.body.as_str()]);
    let exit_headers = refused.pairs("EXIT_HEADER");
    assert!(exit_headers.contains(&("Content-Type".to_owned(), "application/json".to_owned())));
    assert!(refused.values("UPSTREAM_SET").is_empty());

    // 3. No key: 401 with WWW-Authenticate.
    let call = KongCall {
        method: "POST",
        uri: "/midm-base/chat",
        headers: &[("Content-Type", "application/json")],
        conf: "",
    };
    let (_, answer, refused) = kong_round_trip(&service, &call);
    assert_denied(&answer, 401, NO_KEY);
    assert_eq!(refused.exit(), Some(401));
    assert!(
        refused
            .pairs("EXIT_HEADER")
            .contains(&("WWW-Authenticate".to_owned(), REALM.to_owned())),
        "{}",
        refused.dump()
    );

    // 4. Two apikey headers: both are sent, and the service refuses the ambiguity.
    let call = KongCall {
        method: "POST",
        uri: "/midm-base/chat",
        headers: &[("apikey", USER1_KEY), ("apikey", ADMIN_KEY)],
        conf: "",
    };
    let (unreachable, answer, refused) = kong_round_trip(&service, &call);
    assert_eq!(
        unreachable
            .tagged("SEND")
            .iter()
            .filter(|l| l[0] == "apikey")
            .count(),
        2
    );
    assert_denied(&answer, 401, "Duplicate API key found");
    assert_eq!(refused.exit(), Some(401));

    // 5. Key in the query: found through X-Original-URI, then removed from the upstream query.
    let uri = format!("/midm-base/chat?stream=true&apikey={USER1_KEY}");
    let call = KongCall {
        method: "POST",
        uri: &uri,
        headers: &[],
        conf: "",
    };
    let (_, answer, allowed) = kong_round_trip(&service, &call);
    assert_user1_midm(&answer);
    assert_eq!(allowed.values("UPSTREAM_QUERY"), ["stream=true"]);

    // 6. hide_credentials = false keeps the key upstream.
    let call = KongCall {
        method: "POST",
        uri: &uri,
        headers: &[("x-api-key", USER1_KEY)],
        conf: "hide_credentials = false",
    };
    let (_, answer, allowed) = kong_round_trip(&service, &call);
    assert_user1_midm(&answer);
    let cleared = allowed.values("UPSTREAM_CLEAR");
    assert!(
        !cleared
            .iter()
            .any(|c| c.eq_ignore_ascii_case("apikey") || c.eq_ignore_ascii_case("x-api-key")),
        "{}",
        allowed.dump()
    );
    assert!(allowed.values("UPSTREAM_QUERY").is_empty());

    // 7. A route pin in the plugin's config travels as ?metadata_id= on the auth URL.
    let call = KongCall {
        method: "POST",
        uri: "/other",
        headers: &[("apikey", ADMIN_KEY)],
        conf: r#"metadata_id = "azure-gpt4o""#,
    };
    let (unreachable, answer, allowed) = kong_round_trip(&service, &call);
    assert!(
        unreachable.tagged("CALL")[0][1].ends_with("/auth?metadata_id=azure-gpt4o"),
        "{}",
        unreachable.dump()
    );
    assert_allowed(&answer);
    assert_eq!(answer.header("x-consumer-id"), Some("azure-gpt4o"));
    assert!(
        allowed
            .pairs("UPSTREAM_SET")
            .contains(&("X-Consumer-ID".to_owned(), "azure-gpt4o".to_owned()))
    );

    // 8. An answer the plugin does not expect (a misconfigured auth_url, say) fails closed.
    let odd = Response {
        status: 404,
        headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
        body: r#"{"message":"Not found"}"#.to_owned(),
    };
    let call = KongCall {
        method: "POST",
        uri: "/midm-base/chat",
        headers: &[("apikey", USER1_KEY)],
        conf: "",
    };
    let run = run_plugin(&service, &call, Some(&odd));
    assert_eq!(run.exit(), Some(503), "{}", run.dump());
    assert!(run.values("UPSTREAM_SET").is_empty());
}

#[test]
fn kong_plugin_relays_the_ratelimit_fields_to_the_client() {
    away_from_midnight();
    let service = Service::with_files_env(
        "",
        &limited_seed(),
        &[("UMA_AUTH__ORIGINAL_REQUEST", "original")],
    );
    let call = KongCall {
        method: "POST",
        uri: "/v1/chat",
        headers: &[("apikey", "capped-key")],
        conf: "",
    };
    for left in (0..3).rev() {
        let (_, answer, allowed) = kong_round_trip(&service, &call);
        assert_allowed(&answer);
        assert_eq!(allowed.exit(), None, "{}", allowed.dump());
        // Both fields are set on the client's response, in header_filter, as the service sent them...
        let set = allowed.pairs("CLIENT_SET");
        let mut names: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["RateLimit", "RateLimit-Policy"],
            "{}",
            allowed.dump()
        );
        for (name, value) in &set {
            assert_eq!(answer.header(name), Some(value.as_str()), "{name}");
            assert!(
                allowed.position("PHASE", "header_filter") < allowed.position("CLIENT_SET", name),
                "{name} must be set in header_filter: {}",
                allowed.dump()
            );
        }
        assert_eq!(
            day_remaining(answer.header("ratelimit").expect("RateLimit")),
            left
        );
        // ...and never on the upstream request.
        let upstream = allowed.pairs("UPSTREAM_SET");
        assert_eq!(upstream.len(), 12, "{}", allowed.dump());
        assert!(
            !upstream
                .iter()
                .any(|(k, _)| k.to_ascii_lowercase().starts_with("ratelimit")),
            "{}",
            allowed.dump()
        );
    }
    // The 4th call: the service's 429 goes to the client with its body, Retry-After and fields.
    let (_, answer, refused) = kong_round_trip(&service, &call);
    assert_rate_limited(&answer);
    assert_kong_relays_429(&refused, &answer);
    assert!(
        refused.tagged("CLIENT_SET").is_empty(),
        "{}",
        refused.dump()
    );
    assert!(refused.values("UPSTREAM_SET").is_empty());
    // An entry without limits: nothing is added to the client's response.
    let call = KongCall {
        headers: &[("apikey", "free-key")],
        ..call
    };
    let (_, answer, allowed) = kong_round_trip(&service, &call);
    assert_allowed(&answer);
    assert_eq!(answer.header("ratelimit"), None);
    assert!(
        allowed.tagged("CLIENT_SET").is_empty(),
        "{}",
        allowed.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// Budget refusals (SPEC §8.1, §9) through Traefik, Envoy and Kong
// ---------------------------------------------------------------------------------------------

const BUDGET_EXCEEDED: &str = "Usage budget exceeded";
/// The ingest token of the service below (`usage.token`).
const USAGE_TOKEN: &str = "shape-test-usage-token";

/// `spent` (key `spent-key`), whose only entry `spent-entry` has a budget of 10 tokens a day.
fn budget_seed() -> String {
    let spent = metadata_plugin(&[("spent-entry", "p1")]).replace(
        "              input_cost_per_token:",
        "              limits: {tokens_per_day: 10}\n              input_cost_per_token:",
    );
    assert!(spent.contains("tokens_per_day"));
    format!(
        "consumers:\n  - username: spent\n    keyauth_credentials: [{{key: spent-key}}]\n{spent}"
    )
}

/// Records 11 tokens for `spent` (POST /usage, as a log shipper does) and waits until the
/// service refuses its calls.
fn spend_the_budget(service: &Service) {
    let body = br#"{"request_id":"shape-1","consumer":"spent","metadata_id":"spent-entry","input_tokens":10,"output_tokens":1}"#;
    let headers = owned(&[
        ("Host", "127.0.0.1"),
        ("Authorization", &format!("Bearer {USAGE_TOKEN}")),
        ("Content-Type", "application/json"),
        ("Content-Length", &body.len().to_string()),
    ]);
    let answer = send_body(service.addr, "POST", "/usage", &headers, body);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["accepted"], 1, "{answer:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let r = service.auth("spent-key", "/v1/chat");
        if r.status == 429 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the budget is not enforced 2 s after the record: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The service's budget 429 as the client must get it: status, JSON body and headers.
fn assert_budget_refused(r: &Response) {
    assert_denied(r, 429, BUDGET_EXCEEDED);
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After must be an integer: {r:?}"));
    assert!((1..=86_400).contains(&retry_after), "{r:?}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""tokens-day";q=10;w=86400"#),
        "{r:?}"
    );
    let state = r.header("ratelimit").expect("RateLimit");
    assert!(state.starts_with(r#""tokens-day";r=0;t="#), "{state}");
}

#[test]
fn budget_refusals_reach_the_client_through_traefik_envoy_and_kong() {
    away_from_midnight();
    let service = Service::with_files_env("", &budget_seed(), &[("UMA_USAGE__TOKEN", USAGE_TOKEN)]);
    let traefik = Traefik::load();
    let envoy = Envoy::load();
    let call = ClientCall::post("/v1/chat", &[("apikey", "spent-key")]);
    // Before any usage, each shape is allowed.
    assert_allowed(&traefik.send(&service, &call));
    assert_allowed(&envoy.send(&service, &call));

    spend_the_budget(&service);

    // Traefik returns any non-2xx answer as it is; Envoy passes the body and the allowed headers.
    assert_budget_refused(&traefik.send(&service, &call));
    let r = envoy.send(&service, &call);
    assert_eq!(r.status, 429, "{r:?}");
    assert_budget_refused(&envoy.to_client(&r));

    // Kong's plugin answers the client with the service's status, body and headers.
    let kong_call = KongCall {
        method: "POST",
        uri: "/v1/chat",
        headers: &[("apikey", "spent-key")],
        conf: "",
    };
    let (_, answer, refused) = kong_round_trip(&service, &kong_call);
    assert_budget_refused(&answer);
    assert_kong_relays_429(&refused, &answer);
    assert!(refused.values("UPSTREAM_SET").is_empty());
}

// ---------------------------------------------------------------------------------------------
// The configuration files
// ---------------------------------------------------------------------------------------------

fn assert_exact_metadata_headers(names: &[String], file: &str) {
    let mut sorted = names.to_vec();
    sorted.sort();
    let mut expected: Vec<String> = METADATA_HEADERS.iter().map(|h| (*h).to_owned()).collect();
    expected.sort();
    assert_eq!(
        sorted, expected,
        "{file}: exactly the twelve metadata headers"
    );
}

fn assert_forward_auth(forward_auth: &Value, file: &str) -> String {
    assert_eq!(
        forward_auth["trustForwardHeader"],
        Value::Bool(false),
        "{file}: trustForwardHeader must be explicitly false"
    );
    let address = forward_auth["address"].as_str().expect("address");
    let (scheme, host, port, target) = split_url(address);
    assert_eq!(scheme, "http", "{file}");
    assert_eq!(port, 8089, "{file}: the service's port");
    // With the body (SPEC §8.3): /auth-body, bounded like the service, Content-Type passed, and
    // the input tokens counted copied upstream with the twelve.
    let body = forward_auth["forwardBody"] == Value::Bool(true);
    let (endpoint, mut expected_request) = if body {
        assert_eq!(forward_auth["maxBodySize"], 1_048_576, "{file}");
        (
            "/auth-body",
            vec!["apikey", "x-api-key", "authorization", "content-type"],
        )
    } else {
        assert!(forward_auth["maxBodySize"].is_null(), "{file}");
        ("/auth", vec!["apikey", "x-api-key", "authorization"])
    };
    assert_eq!(target, endpoint, "{file}: no query a client could extend");
    let mut response = strings(&forward_auth["authResponseHeaders"]);
    if body {
        let at = response.iter().position(|h| h == "X-User-Input-Tokens");
        response.remove(at.unwrap_or_else(|| panic!("{file}: X-User-Input-Tokens not copied")));
    }
    assert_exact_metadata_headers(&response, file);
    let request_headers: BTreeSet<String> = strings(&forward_auth["authRequestHeaders"])
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    expected_request.sort_unstable();
    assert_eq!(
        request_headers,
        lower(&expected_request),
        "{file}: only the key headers (and the body's type) reach the service"
    );
    host
}

#[test]
fn traefik_dynamic_config_strips_authenticates_and_hides_on_every_llm_router() {
    let doc = yaml("traefik/dynamic.yml");
    let middlewares = &doc["http"]["middlewares"];
    let host = assert_forward_auth(&middlewares["uma-auth"]["forwardAuth"], "dynamic.yml");
    assert_eq!(host, "127.0.0.1");
    let host = assert_forward_auth(&middlewares["uma-auth-body"]["forwardAuth"], "dynamic.yml");
    assert_eq!(host, "127.0.0.1");
    let routers = doc["http"]["routers"].as_object().expect("routers");
    let mut protected = Vec::new();
    for (name, router) in routers {
        let rule = router["rule"].as_str().expect("rule");
        let names = if router["middlewares"].is_null() {
            Vec::new()
        } else {
            strings(&router["middlewares"])
        };
        let chain = expand_chain(middlewares, &names);
        let auths: Vec<usize> = (0..chain.len())
            .filter(|&i| middlewares[chain[i].as_str()]["forwardAuth"].is_object())
            .collect();
        // One auth call per client call: both would count it twice in the TDL counters.
        assert!(auths.len() <= 1, "{name}: several forwardAuth middlewares");
        let Some(&auth) = auths.first() else {
            // Only the service's own API goes without forwardAuth: it checks the key itself.
            assert_eq!(
                router["service"], "user-metadata-service",
                "{name} is not protected"
            );
            assert!(rule.contains("/api/"), "{name}: {rule}");
            continue;
        };
        let before: BTreeSet<String> = chain[..auth]
            .iter()
            .flat_map(|m| removed_headers(&middlewares[m.as_str()]))
            .collect();
        let after: BTreeSet<String> = chain[auth + 1..]
            .iter()
            .flat_map(|m| removed_headers(&middlewares[m.as_str()]))
            .collect();
        assert!(
            before.contains("x-metadata-id"),
            "{name}: X-Metadata-Id must be removed before forwardAuth"
        );
        assert!(
            !before.contains("apikey") && !before.contains("x-api-key"),
            "{name}: the key must reach forwardAuth"
        );
        for key in ["apikey", "x-api-key"] {
            assert!(after.contains(key), "{name}: {key} must be hidden upstream");
        }
        protected.push(format!("{rule} via {}", chain[auth]));
    }
    // The LLM routes check the body too (models and token limits).
    for path in ["/midm-base/chat", "/gpt4o/chat"] {
        assert!(
            protected
                .iter()
                .any(|r| r.contains(&format!("`{path}`")) && r.ends_with("via uma-auth-body")),
            "no router checking the body for {path}: {protected:?}"
        );
    }
    let url = doc["http"]["services"]["user-metadata-service"]["loadBalancer"]["servers"][0]["url"]
        .as_str()
        .expect("service url");
    assert_eq!(split_url(url).2, 8089);
}

#[test]
fn traefik_kubernetes_middlewares_match_the_file_provider() {
    let docs = yaml_documents("traefik/middleware.k8s.yml");
    let file = yaml("traefik/dynamic.yml");
    let file_middlewares = &file["http"]["middlewares"];
    let mut seen = BTreeSet::new();
    for doc in &docs {
        assert_eq!(doc["apiVersion"], "traefik.io/v1alpha1", "{doc}");
        let name = doc["metadata"]["name"].as_str().expect("name");
        match doc["kind"].as_str() {
            Some("Middleware") => {
                let spec = &doc["spec"];
                if spec["forwardAuth"].is_object() {
                    assert_forward_auth(&spec["forwardAuth"], "middleware.k8s.yml");
                    assert_eq!(
                        spec["forwardAuth"]["authResponseHeaders"],
                        file_middlewares[name]["forwardAuth"]["authResponseHeaders"]
                    );
                } else {
                    assert_eq!(
                        removed_headers(spec),
                        removed_headers(&file_middlewares[name]),
                        "{name} differs from dynamic.yml"
                    );
                }
                seen.insert(name.to_owned());
            }
            Some("IngressRoute") => {
                for route in array(&doc["spec"]["routes"]) {
                    let names: Vec<&str> = array(&route["middlewares"])
                        .iter()
                        .map(|m| m["name"].as_str().expect("middleware name"))
                        .collect();
                    assert_eq!(
                        names,
                        [
                            "uma-strip-client-headers",
                            "uma-auth-body",
                            "uma-hide-credentials"
                        ],
                        "{route}"
                    );
                }
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    let expected: BTreeSet<String> = [
        "uma-strip-client-headers",
        "uma-auth",
        "uma-auth-body",
        "uma-hide-credentials",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(seen, expected);
}

#[test]
fn envoy_config_authorizes_every_llm_route_and_fails_closed() {
    let doc = yaml("envoy/envoy.yaml");
    let hcm = http_connection_manager(&doc);
    assert_eq!(hcm["normalize_path"], Value::Bool(true));
    assert_eq!(hcm["merge_slashes"], Value::Bool(true));

    // Filter order: drop client copies, ask the service, route.
    let filters: Vec<&str> = array(&hcm["http_filters"])
        .iter()
        .map(|f| f["name"].as_str().expect("filter name"))
        .collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.router"
        ]
    );
    let removed: BTreeSet<String> = array(
        &http_filter(hcm, "envoy.filters.http.header_mutation")["mutations"]["request_mutations"],
    )
    .iter()
    .map(|m| m["remove"].as_str().expect("remove").to_owned())
    .collect();
    let mut upstream = lower(&METADATA_HEADERS);
    upstream.insert("x-user-input-tokens".to_owned());
    assert_eq!(removed, upstream);

    let ext_authz = http_filter(hcm, "envoy.filters.http.ext_authz");
    assert_eq!(
        ext_authz["failure_mode_allow"],
        Value::Bool(false),
        "failure_mode_allow must be explicitly false"
    );
    assert_eq!(ext_authz["status_on_error"]["code"], "ServiceUnavailable");
    // The body goes to /auth-body (SPEC §8.3), whole or not at all, bounded like the service.
    let body = &ext_authz["with_request_body"];
    assert_eq!(body["max_request_bytes"], 1_048_576);
    assert_eq!(body["allow_partial_message"], Value::Bool(false));
    let service = &ext_authz["http_service"];
    assert_eq!(service["path_prefix"], "/auth-body");
    let server = &service["server_uri"];
    assert_eq!(server["cluster"], "uma");
    assert_eq!(split_url(server["uri"].as_str().expect("uri")).2, 8089);
    let timeout = duration_ms(server["timeout"].as_str().expect("timeout"));
    assert!(
        timeout > 0.0 && timeout <= 1000.0,
        "timeout {timeout} ms must be short"
    );
    assert_eq!(
        exact_patterns(&service["authorization_request"]["allowed_headers"]),
        lower(&["apikey", "x-api-key", "authorization", "content-type"])
    );
    let response = &service["authorization_response"];
    assert_eq!(
        exact_patterns(&response["allowed_upstream_headers"]),
        upstream
    );
    let on_deny = exact_patterns(&response["allowed_client_headers"]);
    // 401 answers keep WWW-Authenticate, 429 and 503 Retry-After, 429 the RateLimit fields.
    for name in [
        "www-authenticate",
        "retry-after",
        "ratelimit-policy",
        "ratelimit",
    ] {
        assert!(on_deny.contains(name), "a denial drops {name}");
    }
    // On a 200 only the RateLimit fields go to the client (SPEC §8.1), never a metadata header.
    assert_eq!(
        exact_patterns(&response["allowed_client_headers_on_success"]),
        lower(&["ratelimit-policy", "ratelimit"])
    );

    // The auth cluster is the service on 127.0.0.1:8089.
    let cluster = array(&doc["static_resources"]["clusters"])
        .iter()
        .find(|c| c["name"] == "uma")
        .expect("cluster uma");
    assert!(
        duration_ms(
            cluster["connect_timeout"]
                .as_str()
                .expect("connect_timeout")
        ) <= 1000.0
    );
    let endpoint = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(endpoint["address"], "127.0.0.1");
    assert_eq!(endpoint["port_value"], 8089);

    // Every route is either checked by ext_authz with the keys removed upstream, or the
    // service's own API (ext_authz off, key kept: the service checks it).
    let mut protected = Vec::new();
    for host in array(&hcm["route_config"]["virtual_hosts"]) {
        for route in array(&host["routes"]) {
            let per_filter = &route["typed_per_filter_config"]["envoy.filters.http.ext_authz"];
            let path = route["match"]["path_separated_prefix"]
                .as_str()
                .or(route["match"]["path"].as_str())
                .or(route["match"]["prefix"].as_str())
                .expect("route path")
                .to_owned();
            if per_filter["disabled"] == Value::Bool(true) {
                assert_eq!(route["route"]["cluster"], "uma", "{path} skips ext_authz");
                assert!(path.starts_with("/api/"), "{path} skips ext_authz");
                continue;
            }
            assert!(per_filter.is_null(), "{path}: {per_filter}");
            let removed = strings(&route["request_headers_to_remove"]);
            for key in ["apikey", "x-api-key"] {
                assert!(
                    removed.iter().any(|h| h == key),
                    "{path}: {key} kept upstream"
                );
            }
            protected.push(path);
        }
    }
    for path in ["/midm-base/chat", "/gpt4o/chat"] {
        assert!(protected.iter().any(|p| p == path), "{path} not protected");
    }
}

/// Every route of a Kong declarative document, top-level and under `services[].routes[]`, with
/// the name of its service.
fn kong_routes(doc: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    if let Some(routes) = doc["routes"].as_array() {
        for route in routes {
            let service = route["service"].as_str().unwrap_or_default().to_owned();
            out.push((service, route.clone()));
        }
    }
    if let Some(services) = doc["services"].as_array() {
        for service in services {
            let name = service["name"].as_str().expect("service name");
            for route in service["routes"].as_array().into_iter().flatten() {
                out.push((name.to_owned(), route.clone()));
            }
        }
    }
    out
}

fn plugin_names(route: &Value) -> Vec<String> {
    route["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["name"].as_str().expect("plugin name").to_owned())
        .collect()
}

#[test]
fn kong_config_puts_the_plugin_on_every_route_of_the_seed_document() {
    let doc = yaml("kong/kong.yaml");
    assert_eq!(doc["_format_version"], "3.0");
    assert!(
        doc["consumers"].is_null(),
        "Kong no longer needs the consumers (the service's seed has them)"
    );
    let routes = kong_routes(&doc);
    let service_url = |name: &str| -> String {
        array(&doc["services"])
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["url"].as_str())
            .unwrap_or_else(|| panic!("service {name}"))
            .to_owned()
    };
    let mut protected = Vec::new();
    for (service, route) in &routes {
        let plugins = plugin_names(route);
        for gone in ["key-auth", "acl", "user-metadata"] {
            assert!(
                !plugins.iter().any(|p| p == gone),
                "{gone} on {route}: Kong has no consumers any more"
            );
        }
        let paths = strings(&route["paths"]);
        if service == "user-metadata-service" {
            // The service's own API: proxied as it is, it checks the key itself.
            assert_eq!(split_url(&service_url(service)).2, 8089);
            assert_eq!(route["strip_path"], Value::Bool(false), "{route}");
            assert!(paths.iter().all(|p| p.starts_with("/api/")), "{route}");
            continue;
        }
        let plugin = array(&route["plugins"])
            .iter()
            .find(|p| p["name"] == "uma-forward-auth")
            .unwrap_or_else(|| panic!("uma-forward-auth missing on {route}"));
        let conf = &plugin["config"];
        if let Some(url) = conf["auth_url"].as_str() {
            let (_, _, port, target) = split_url(url);
            assert_eq!((port, target.as_str()), (8089, "/auth"), "{route}");
        }
        if let Some(timeout) = conf["timeout"].as_u64() {
            assert!(timeout > 0 && timeout <= 1000, "timeout {timeout} ms");
        }
        assert_ne!(conf["hide_credentials"], Value::Bool(false), "{route}");
        protected.extend(paths);
    }
    // Every path the service's seed guards (config/seed.yaml, the seed document) is guarded in
    // Kong by the plugin.
    let seed_text = std::fs::read_to_string(manifest_dir().join("config/seed.yaml")).expect("seed");
    let seed: Value = serde_saphyr::from_str(&seed_text).expect("seed YAML");
    for (_, route) in kong_routes(&seed) {
        for path in strings(&route["paths"]) {
            if !path.starts_with("/api/") {
                assert!(
                    protected.contains(&path),
                    "{path} is not protected in kong.yaml"
                );
            }
        }
    }
    assert!(protected.iter().any(|p| p == "/midm-base/chat"));
    assert!(protected.iter().any(|p| p == "/gpt4o/chat"));
}

#[test]
fn kong_plugin_lua_compiles_and_names_all_twelve_headers() {
    let luac = lua_tool("luac5.1");
    for file in ["handler.lua", "schema.lua"] {
        let path = plugin_dir().join(file);
        let output = Command::new(&luac)
            .arg("-p")
            .arg(&path)
            .output()
            .expect("run luac5.1");
        assert!(
            output.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let handler = read_deploy("kong/kong/plugins/uma-forward-auth/handler.lua");
    for name in METADATA_HEADERS {
        assert!(
            handler.contains(&format!("\"{name}\"")),
            "handler.lua does not name {name}"
        );
    }
    assert!(handler.contains("require(\"resty.http\")"));
    assert!(handler.contains("kong.service.request.set_header"));
    assert!(handler.contains("kong.response.exit"));
    let schema = read_deploy("kong/kong/plugins/uma-forward-auth/schema.lua");
    assert!(schema.contains("name = \"uma-forward-auth\""));
}

/// The target of a top-level plugin entry of a declarative file: its `service` or `route` name.
fn plugin_target(plugin: &Value) -> String {
    plugin["service"]
        .as_str()
        .or(plugin["route"].as_str())
        .unwrap_or_else(|| panic!("a plugin for the whole gateway: {plugin}"))
        .to_owned()
}

/// The environment variable a `{vault://env/name}` reference reads (Kong upper-cases the name).
fn env_vault_variable(value: &str) -> Option<String> {
    value
        .strip_prefix("{vault://env/")
        .and_then(|rest| rest.strip_suffix('}'))
        .map(|name| name.to_ascii_uppercase().replace('-', "_"))
}

#[test]
fn kong_usage_file_posts_ai_proxy_statistics_to_the_services_usage_endpoint() {
    let doc = yaml("kong/usage-http-log.yaml");
    assert_eq!(doc["_format_version"], "3.0");
    // Every plugin names a service or route of kong.yaml, the file it is merged into.
    let kong = yaml("kong/kong.yaml");
    let mut names = BTreeSet::new();
    for service in array(&kong["services"]) {
        names.insert(service["name"].as_str().expect("service name").to_owned());
    }
    for (_, route) in kong_routes(&kong) {
        names.insert(route["name"].as_str().expect("route name").to_owned());
    }
    let auth_host = kong_routes(&kong)
        .iter()
        .flat_map(|(_, route)| route["plugins"].as_array().cloned().unwrap_or_default())
        .find(|p| p["name"] == "uma-forward-auth")
        .and_then(|p| p["config"]["auth_url"].as_str().map(|u| split_url(u).1))
        .expect("uma-forward-auth's auth_url in kong.yaml");
    let (mut counted, mut logged) = (BTreeSet::new(), BTreeSet::new());
    for plugin in array(&doc["plugins"]) {
        let target = plugin_target(plugin);
        assert!(names.contains(&target), "{target} is not in kong.yaml");
        let conf = &plugin["config"];
        match plugin["name"].as_str() {
            Some("ai-proxy") => {
                // Token counts in the log (ai.proxy.usage), prompts and answers not.
                assert_eq!(
                    conf["logging"]["log_statistics"],
                    Value::Bool(true),
                    "{plugin}"
                );
                assert_eq!(
                    conf["logging"]["log_payloads"],
                    Value::Bool(false),
                    "{plugin}"
                );
                assert!(conf["route_type"].is_string(), "{plugin}");
                assert!(conf["model"]["provider"].is_string(), "{plugin}");
                assert!(counted.insert(target), "{plugin}: twice");
            }
            Some("http-log") => {
                let endpoint = conf["http_endpoint"].as_str().expect("http_endpoint");
                let (scheme, host, port, path) = split_url(endpoint);
                assert_eq!(
                    (scheme.as_str(), port, path.as_str()),
                    ("http", 8089, "/usage"),
                    "{endpoint}: the service's main listener"
                );
                assert_eq!(host, auth_host, "{endpoint}: where uma-forward-auth asks");
                assert_eq!(conf["method"], "POST");
                assert_eq!(conf["content_type"], "application/json");
                let headers = conf["headers"].as_object().expect("headers");
                for name in headers.keys() {
                    // Kong's http-log schema refuses these in `headers`.
                    assert!(
                        !["host", "content-type", "content-length"]
                            .contains(&name.to_ascii_lowercase().as_str()),
                        "{name}"
                    );
                }
                let authorization = headers["Authorization"].as_str().expect("Authorization");
                match env_vault_variable(authorization) {
                    // The service refuses unknown UMA_ variables, should they share an environment.
                    Some(variable) => assert!(!variable.starts_with("UMA_"), "{variable}"),
                    None => assert!(authorization.starts_with("Bearer "), "{authorization}"),
                }
                let queue = &conf["queue"];
                let batch = queue["max_batch_size"]
                    .as_u64()
                    .expect("queue.max_batch_size");
                assert!(
                    (1..=1000).contains(&batch),
                    "max_batch_size {batch}: the service takes arrays of up to 1000"
                );
                let retry = queue["max_retry_time"]
                    .as_f64()
                    .expect("queue.max_retry_time");
                assert!(
                    retry > 0.0 && retry < 6.0 * 3600.0,
                    "max_retry_time {retry} s: retries must stay inside usage.dedup_hours (6 h)"
                );
                let delay = queue["max_coalescing_delay"]
                    .as_f64()
                    .expect("max_coalescing_delay");
                assert!(
                    delay <= 1.0,
                    "max_coalescing_delay {delay} s delays budgets"
                );
                let keepalive = conf["keepalive"].as_f64().expect("keepalive");
                assert!(
                    keepalive < 60_000.0,
                    "keepalive {keepalive} ms: below the service's idle timeout"
                );
                assert!(logged.insert(target), "{plugin}: twice");
            }
            other => panic!("unexpected plugin {other:?}"),
        }
    }
    assert_eq!(
        counted, logged,
        "every service with statistics has its log posted"
    );
    // Every LLM service of kong.yaml reports its usage; the service's own API does not.
    for service in array(&kong["services"]) {
        let name = service["name"].as_str().unwrap();
        assert_eq!(
            logged.contains(name),
            name != "user-metadata-service",
            "{name}"
        );
    }
    assert!(read_deploy("kong/README.md").contains("usage-http-log.yaml"));
    assert!(read_deploy("kong/kong.yaml").contains("usage-http-log.yaml"));
}

#[test]
fn litellm_callback_posts_native_records_built_from_the_gateways_headers() {
    let readme = read_deploy("litellm/README.md");
    // LiteLLM's config names a module next to it and an instance the module defines.
    let (module, instance) = readme
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("callbacks: "))
        .and_then(|v| v.split_once('.'))
        .expect("README: `litellm_settings: callbacks: <module>.<instance>`");
    let code = read_deploy(&format!("litellm/{module}.py"));
    let class = code
        .lines()
        .find_map(|l| l.strip_prefix("class ")?.strip_suffix("(CustomLogger):"))
        .expect("a CustomLogger subclass");
    assert!(
        code.lines().any(|l| l == format!("{instance} = {class}()")),
        "{module}.py does not define {instance}"
    );
    assert!(code.contains("from litellm.integrations.custom_logger import CustomLogger"));
    assert!(code.contains(
        "async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):"
    ));
    assert!(!code.contains('\t'), "indented with spaces only");
    // The native record (SPEC §9) and where its fields come from.
    for field in [
        "\"request_id\"",
        "\"consumer\"",
        "\"metadata_id\"",
        "\"usage\"",
        "\"time\"",
        "\"prompt_tokens\"",
        "\"completion_tokens\"",
        "\"cached_tokens\"",
    ] {
        assert!(code.contains(field), "{field}");
    }
    for source in [
        "\"x-consumer-username\"",
        "\"x-consumer-id\"",
        "\"litellm_call_id\"",
        "\"proxy_server_request\"",
        "\"standard_logging_object\"",
        // A client's call id never becomes the request id.
        "\"x-litellm-call-id\"",
    ] {
        assert!(code.contains(source), "{source}");
    }
    assert!(code.contains("\"Bearer \""));
    assert!(code.contains("\"http://127.0.0.1:8089/usage\""));
    // Its settings: none a UMA_ name (the service refuses unknown ones), all in the README.
    let variables: BTreeSet<&str> = code
        .split("os.environ.get(\"")
        .skip(1)
        .chain(code.split("_env_number(\"").skip(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(variables.len() >= 3, "{variables:?}");
    for variable in &variables {
        assert!(!variable.starts_with("UMA_"), "{variable}");
        assert!(
            readme.contains(&format!("`{variable}`")),
            "README: {variable}"
        );
    }
    assert!(
        readme.contains("never from the client")
            || readme.contains("never a value taken from the client")
    );
}
