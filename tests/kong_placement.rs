//! Kong placements of `acl`, `key-auth` and `user-metadata` (SPEC §5 "Kong placement"), through the
//! real binary: every placement Kong honours is honoured with Kong's precedence, and every one the
//! service does not support is a `check` problem — an access-control plugin is never dropped.

mod common;

use std::process::Command;

use common::*;

const ENTRY: &str = "{id: g, provider_name: p, tdl_matrix: {T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: 0, output_cost_per_token: 0}";

/// alice (group `basic`, key `ka`), bob (group `vip`, key `kb`), a global list, and `rest`.
fn seed(rest: &str) -> String {
    format!(
        "consumers:
  - username: alice
    id: 11111111-aaaa
    keyauth_credentials: [{{key: ka}}]
    acls: [{{group: basic}}]
  - username: bob
    keyauth_credentials: [{{key: kb}}]
    acls: [{{group: vip}}]
{rest}"
    )
}

fn global_list() -> String {
    format!("  - name: user-metadata\n    config: {{metadata_list: [{ENTRY}]}}\n")
}

/// A service on `seed(rest)` with the global list appended (`rest` ends inside top-level `plugins:`).
fn served(rest: &str) -> Service {
    Service::with_files("", &seed(&format!("{rest}{}", global_list())))
}

fn status(service: &Service, key: &str, uri: &str) -> u16 {
    service
        .get("/auth", &[("apikey", key), ("X-Forwarded-Uri", uri)])
        .status
}

/// `check` on a seed: exit success and the problem lines.
fn check(seed_text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "kong.yaml", seed_text);
    let out = Command::new(BIN)
        .arg("check")
        .arg("--seed")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(seed_text: &str, path: &str, reason: &str) {
    let (ok, stderr) = check(seed_text);
    assert!(!ok, "check passed:\n{seed_text}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&format!(": {path}: ")) && l.contains(reason)),
        "no problem at {path} ({reason}):\n{stderr}"
    );
}

#[test]
fn a_service_acl_covers_its_nested_and_top_level_routes() {
    let service = served(
        "services:
  - name: openai
    plugins:
      - name: acl
        config: {allow: [vip]}
    routes:
      - name: nested
        paths: [/nested]
routes:
  - name: attached
    service: openai
    paths: [/attached]
  - name: free
    paths: [/free]
plugins:
",
    );
    assert_eq!(status(&service, "ka", "/nested/chat"), 403);
    assert_eq!(status(&service, "ka", "/attached"), 403);
    assert_eq!(status(&service, "kb", "/nested/chat"), 200);
    assert_eq!(status(&service, "ka", "/free"), 200);
}

#[test]
fn top_level_plugins_scoped_by_name_or_id() {
    let service = served(
        "services:
  - name: svc
    id: svc-0001
    routes:
      - name: by-service
        paths: [/s]
routes:
  - name: by-name
    paths: [/n]
  - name: other
    id: route-0002
    paths: [/i]
plugins:
  - name: acl
    route: by-name
    config: {allow: [vip]}
  - name: acl
    route: {id: route-0002}
    config: {deny: [basic]}
  - name: acl
    service: svc-0001
    config: {allow: [vip]}
",
    );
    for uri in ["/n", "/i", "/s"] {
        assert_eq!(status(&service, "ka", uri), 403, "{uri}");
        assert_eq!(status(&service, "kb", uri), 200, "{uri}");
    }
}

#[test]
fn a_global_acl_covers_every_route_and_unrouted_uris_with_kong_precedence() {
    let service = served(
        "services:
  - name: svc
    plugins:
      - name: acl
        config: {allow: [basic]}
    routes:
      - name: service-wins
        paths: [/svc]
      - name: route-wins
        paths: [/route]
        plugins:
          - name: acl
            config: {allow: [vip]}
      - name: disabled
        paths: [/disabled]
        plugins:
          - name: acl
            enabled: false
            config: {allow: [nobody]}
routes:
  - name: plain
    paths: [/plain]
plugins:
  - name: acl
    config: {allow: [vip]}
",
    );
    // Global: routes without their own, and URIs no route matches.
    assert_eq!(status(&service, "ka", "/plain"), 403);
    assert_eq!(status(&service, "ka", "/nowhere"), 403);
    assert_eq!(status(&service, "kb", "/nowhere"), 200);
    // The service's acl beats the global one; the route's beats the service's.
    assert_eq!(status(&service, "ka", "/svc"), 200);
    assert_eq!(status(&service, "kb", "/svc"), 403);
    assert_eq!(status(&service, "ka", "/route"), 403);
    assert_eq!(status(&service, "kb", "/route"), 200);
    // A disabled route acl does not count: the service's applies.
    assert_eq!(status(&service, "ka", "/disabled"), 200);
    assert_eq!(status(&service, "kb", "/disabled"), 403);
}

#[test]
fn top_level_credentials_and_groups_name_their_consumer() {
    let service = served(
        "keyauth_credentials:
  - consumer: alice
    key: alice-second-key
  - consumer: {id: 11111111-aaaa}
    key: alice-third-key
acls:
  - consumer: alice
    group: vip
routes:
  - name: vip-only
    paths: [/vip]
    plugins:
      - name: acl
        config: {allow: [vip]}
plugins:
",
    );
    for key in ["ka", "alice-second-key", "alice-third-key"] {
        let r = service.get("/auth", &[("apikey", key), ("X-Forwarded-Uri", "/vip")]);
        assert_eq!(r.status, 200, "{key}: {r:?}");
        assert_eq!(r.header("x-consumer-username"), Some("alice"));
        assert_eq!(r.header("x-consumer-groups"), Some("basic, vip"));
    }
}

#[test]
fn key_auth_key_names_and_locations_are_honoured() {
    let service = served(
        "routes:
  - name: token
    paths: [/token]
    plugins:
      - name: key-auth
        config: {key_names: [X-Token], key_in_query: false}
plugins:
",
    );
    let call = |headers: &[(&str, &str)], uri: &str| {
        let mut all = vec![("X-Forwarded-Uri", uri)];
        all.extend_from_slice(headers);
        service.get("/auth", &all).status
    };
    assert_eq!(call(&[("x-token", "ka")], "/token"), 200);
    assert_eq!(call(&[("apikey", "ka")], "/token"), 401);
    assert_eq!(call(&[], "/token?x-token=ka"), 401);
    assert_eq!(call(&[("x-api-key", "ka")], "/token"), 200);
    // Elsewhere the default names apply.
    assert_eq!(call(&[("apikey", "ka")], "/other"), 200);
    assert_eq!(call(&[("x-token", "ka")], "/other"), 401);
}

#[test]
fn hosts_choose_routes_but_never_remove_an_acl() {
    let service = served(
        "routes:
  - name: internal
    hosts: [\"*.internal.example\"]
    paths: [/v1]
    plugins:
      - name: acl
        config: {allow: [vip]}
  - name: public
    hosts: [api.example.com]
    paths: [/v1]
plugins:
",
    );
    let call = |host: Option<&str>| {
        let mut headers = vec![("apikey", "ka"), ("X-Forwarded-Uri", "/v1/chat")];
        if let Some(host) = host {
            headers.push(("X-Forwarded-Host", host));
        }
        service.get("/auth", &headers).status
    };
    assert_eq!(call(Some("api.example.com")), 200);
    assert_eq!(call(Some("API.Example.COM:443")), 200);
    assert_eq!(call(Some("a.internal.example")), 403);
    // No route admits the host: every matching route applies its ACL.
    assert_eq!(call(Some("elsewhere.example")), 403);
}

#[test]
fn regex_paths_are_honoured() {
    let service = served(
        "routes:
  - name: versioned
    paths: [\"~/v[0-9]+/chat\"]
    plugins:
      - name: acl
        config: {allow: [vip]}
plugins:
",
    );
    assert_eq!(status(&service, "ka", "/v2/chat"), 403);
    assert_eq!(status(&service, "ka", "/V17/Chat/x"), 403);
    assert_eq!(status(&service, "kb", "/v2/chat"), 200);
    assert_eq!(status(&service, "ka", "/v/chat"), 200);
}

#[test]
fn a_trusted_route_header_names_the_route() {
    let text = seed(&format!(
        "routes:
  - name: vip-route
    paths: [/vip]
    plugins:
      - name: acl
        config: {{allow: [vip]}}
plugins:
{}",
        global_list()
    ));
    let trusting = Service::with_files_env("", &text, &[("UMA_AUTH__TRUST_ROUTE_HEADER", "true")]);
    let call = |service: &Service, route: &str| {
        service
            .get(
                "/auth",
                &[
                    ("apikey", "ka"),
                    ("X-Forwarded-Uri", "/anything"),
                    ("X-Uma-Route", route),
                ],
            )
            .status
    };
    assert_eq!(call(&trusting, "vip-route"), 403);
    assert_eq!(call(&trusting, "no-such-route"), 403);
    assert_eq!(call(&trusting, ""), 200);
    // Untrusted (the default), the header is ignored.
    let ignoring = Service::with_files("", &text);
    assert_eq!(call(&ignoring, "vip-route"), 200);
    assert_eq!(call(&ignoring, "no-such-route"), 200);
}

#[test]
fn unsupported_placements_are_problems_not_ignored_lines() {
    let global = global_list();
    assert_refused(
        &seed(&format!(
            "plugins:\n  - name: acl\n    consumer: alice\n    config: {{allow: [x]}}\n{global}"
        )),
        "plugins[0].consumer",
        "consumer-scoped",
    );
    assert_refused(
        &seed("plugins:\n  - name: acl\n    route: ghost\n    config: {allow: [x]}\n"),
        "plugins[0].route",
        "no route `ghost`",
    );
    assert_refused(
        &seed("plugins:\n  - name: key-auth\n    service: ghost\n"),
        "plugins[0].service",
        "no service `ghost`",
    );
    assert_refused(
        &seed("routes:\n  - name: r\n    service: ghost\n    paths: [/r]\n"),
        "routes[0].service",
        "no service `ghost`",
    );
    assert_refused(
        &seed("keyauth_credentials:\n  - consumer: alice\n    key: k2\n    ttl: 3600\n"),
        "keyauth_credentials[0].ttl",
        "ttl",
    );
    assert_refused(
        &seed("acls:\n  - consumer: nobody\n    group: x\n"),
        "acls[0].consumer",
        "no consumer `nobody`",
    );
    assert_refused(
        &seed(
            "routes:\n  - name: r\n    paths: [/r]\n    plugins:\n      - name: acl\n        config: {whitelist: [x]}\n",
        ),
        "routes[0].plugins[0].config.whitelist",
        "renamed",
    );
    assert_refused(
        &seed(
            "routes:\n  - name: r\n    paths: [/r]\n    plugins:\n      - name: acl\n        config: {allow: [x]}\n      - name: acl\n        config: {allow: [y]}\n",
        ),
        "routes[0].plugins[1]",
        "a second acl plugin",
    );
    assert_refused(
        &seed("routes:\n  - name: r\n    paths: [\"~/v[0-9\"]\n"),
        "routes[0].paths[0]",
        "regular expression",
    );
    assert_refused(
        &seed("routes:\n  - name: r\n    hosts: [\"api.*\"]\n"),
        "routes[0].hosts[0]",
        "leading `*.`",
    );
    let nested_on_consumer = "consumers:\n  - username: carol\n    keyauth_credentials: [{key: kc}]\n    plugins:\n      - name: acl\n        config: {allow: [x]}\n";
    assert_refused(
        nested_on_consumer,
        "consumers[0].plugins[0]",
        "cannot be applied to a consumer",
    );
    // A key that could never match (presented keys are trimmed) is refused (review D14).
    assert_refused(
        "consumers:\n  - username: dave\n    keyauth_credentials: [{key: \" spaced \"}]\n",
        "consumers[0].keyauth_credentials[0].key",
        "whitespace",
    );
    // A username that would break a Redis Cluster hash tag.
    assert_refused(
        "consumers:\n  - username: \"e{vil}\"\n",
        "consumers[0].username",
        "hash tags",
    );
}

#[test]
fn supported_placements_pass_check() {
    let text = seed(&format!(
        "services:
  - name: svc
    plugins:
      - name: key-auth
        config: {{key_names: [apikey]}}
      - name: user-metadata
        config: {{metadata_list: [{ENTRY}]}}
    routes:
      - name: r
        paths: [/r, \"~/v[0-9]+\"]
        methods: [POST]
        hosts: [\"*.example.com\"]
plugins:
  - name: acl
    service: svc
    config: {{allow: [vip]}}
  - name: rate-limiting
    consumer: alice
    config: {{minute: 5}}
{}",
        global_list()
    ));
    let (ok, stderr) = check(&text);
    assert!(ok, "{stderr}");
}

#[test]
fn route_lists_count_as_entries_and_satisfy_config_pins() {
    let dir = tempfile::tempdir().unwrap();
    let seed_text = seed(&format!(
        "routes:\n  - name: r\n    paths: [/r]\n    plugins:\n      - name: user-metadata\n        config: {{metadata_list: [{}]}}\n",
        ENTRY.replace("id: g", "id: route-only")
    ));
    let seed_path = write_file(dir.path(), "kong.yaml", &seed_text);
    let config = write_file(
        dir.path(),
        "uma.toml",
        "[[routes]]\nprefix = \"/r\"\nmetadata_id = \"route-only\"\n\n[[routes]]\nprefix = \"/x\"\nmetadata_id = \"nowhere\"\n",
    );
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .arg("--seed")
        .arg(&seed_path)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("1 metadata entries"), "{stdout}");
    assert!(
        !stderr.contains("`route-only`"),
        "a false warning: {stderr}"
    );
    assert!(
        stderr.contains("routes[1].metadata_id: `nowhere` is in no metadata list"),
        "{stderr}"
    );
}
