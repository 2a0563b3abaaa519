//! Capability gating (SPEC §8.2) through the real binary: routes of both sets require
//! capabilities by name or index, the first one the entry lacks answers 403 with its name, and
//! unknown names or indexes are validation problems with their field paths.

mod common;

use std::process::Command;

use common::*;

const TDL: &str = "{T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}";

fn entry(id: &str, capabilities: &str) -> String {
    format!(
        "{{id: {id}, provider_name: p, tdl_matrix: {TDL}, capabilities: {capabilities}, max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: 0, output_cost_per_token: 0}}"
    )
}

/// Consumers with image generation on (`img`), off (`noimg`), and a short flags array (`short`),
/// a seed route `/images` requiring image generation by name, and `rest`.
fn seed(rest: &str) -> String {
    format!(
        "consumers:
  - username: img
    keyauth_credentials: [{{key: k-img}}]
    plugins: [{{name: user-metadata, config: {{metadata_list: [{}]}}}}]
  - username: noimg
    keyauth_credentials: [{{key: k-noimg}}]
    plugins: [{{name: user-metadata, config: {{metadata_list: [{}]}}}}]
  - username: short
    keyauth_credentials: [{{key: k-short}}]
    plugins: [{{name: user-metadata, config: {{metadata_list: [{}]}}}}]
routes:
  - name: images
    paths: [/images]
    plugins:
      - name: user-metadata
        config: {{require_capabilities: [image_generation]}}
{rest}",
        entry("e", "[1, 1, 1, 0, 1]"),
        entry("e", "[1, 1, 0, 0, 1]"),
        entry("e", "[1, 1, 1]"),
    )
}

const CONFIG: &str = "[[routes]]\nprefix = \"/images/hd\"\nrequire_capabilities = [4]\n\n[[routes]]\nprefix = \"/speech\"\nrequire_capabilities = [\"speech\"]\n";

fn status(service: &Service, key: &str, uri: &str) -> (u16, String) {
    let r = service.get("/auth", &[("apikey", key), ("X-Forwarded-Uri", uri)]);
    let message = if r.status == 200 {
        String::new()
    } else {
        r.json()["message"].as_str().unwrap_or_default().to_owned()
    };
    (r.status, message)
}

fn refused(name: &str) -> (u16, String) {
    (403, format!("Capability not enabled: {name}"))
}

#[test]
fn routes_of_both_sets_require_capabilities() {
    let service = Service::with_files(CONFIG, &seed(""));
    let ok = (200, String::new());
    // A seed route by name: flag 1 passes, flag 0 is refused with the name.
    assert_eq!(status(&service, "k-img", "/images/create"), ok);
    assert_eq!(
        status(&service, "k-noimg", "/images/create"),
        refused("image_generation")
    );
    // A config route by index, beside the seed route: both apply; a shorter array lacks index 4.
    assert_eq!(status(&service, "k-img", "/images/hd/1"), ok);
    assert_eq!(
        status(&service, "k-short", "/images/hd/1"),
        refused("premium")
    );
    assert_eq!(
        status(&service, "k-noimg", "/images/hd/1"),
        refused("image_generation")
    );
    // A config route by name.
    assert_eq!(status(&service, "k-img", "/speech"), refused("speech"));
    // Elsewhere nothing is required; /api/* is not gated.
    assert_eq!(status(&service, "k-noimg", "/chat"), ok);
    assert_eq!(
        service
            .get("/api/user-metadata", &[("apikey", "k-noimg")])
            .status,
        200
    );
    let metrics = service.get("/metrics", &[]).body;
    assert!(
        metrics.contains(r#"uma_requests_total{endpoint="auth",decision="forbidden"} 4"#),
        "{metrics}"
    );
}

#[test]
fn every_applicable_user_metadata_instance_adds_its_requirements() {
    let rest = "services:
  - name: svc
    plugins:
      - name: user-metadata
        config: {require_capabilities: [1]}
    routes:
      - name: svc-route
        paths: [/svc]
        plugins:
          - name: user-metadata
            config: {require_capabilities: [premium]}
plugins:
  - name: user-metadata
    config: {require_capabilities: [chat]}
";
    let service = Service::with_files("", &seed(rest));
    let names = |key| status(&service, key, "/svc/x");
    assert_eq!(names("k-img"), (200, String::new()));
    // The short array has advanced_chat (1) and chat (0) but not premium (4).
    assert_eq!(names("k-short"), refused("premium"));
    // The global instance applies to URIs no route matches.
    assert_eq!(status(&service, "k-img", "/unrouted").0, 200);
}

fn check(config: &str, seed_text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_file(dir.path(), "uma.toml", config);
    let seed_path = write_file(dir.path(), "kong.yaml", seed_text);
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config_path)
        .arg("--seed")
        .arg(&seed_path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_lists_the_requirements() {
    let (ok, stdout, stderr) = check(CONFIG, &seed(""));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("seed route `images` requires image_generation"),
        "{stdout}"
    );
    assert!(
        stdout.contains("config route `/images/hd` requires premium"),
        "{stdout}"
    );
    assert!(
        stdout.contains("config route `/speech` requires speech"),
        "{stdout}"
    );
}

#[test]
fn unknown_names_and_indexes_are_problems_with_their_paths() {
    let config = "[[routes]]\nprefix = \"/a\"\nrequire_capabilities = [\"video\", 9]\n";
    let rest = "  - name: bad\n    paths: [/bad]\n    plugins:\n      - name: user-metadata\n        config: {require_capabilities: [telepathy, 5]}\n";
    let (ok, _, stderr) = check(config, &seed(rest));
    assert!(!ok);
    for (path, reason) in [
        (
            "routes[0].require_capabilities[0]",
            "unknown capability `video`",
        ),
        (
            "routes[0].require_capabilities[1]",
            "index 9 is outside capabilities.names",
        ),
        (
            "routes[1].plugins[0].config.require_capabilities[0]",
            "unknown capability `telepathy`",
        ),
        (
            "routes[1].plugins[0].config.require_capabilities[1]",
            "index 5 is outside",
        ),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!(": {path}: ")) && l.contains(reason)),
            "no `{reason}` at {path}:\n{stderr}"
        );
    }
    // Custom names: the config decides what each index is called.
    let named = "[capabilities]\nnames = [\"text\", \"vision\"]\n[[routes]]\nprefix = \"/v\"\nrequire_capabilities = [\"vision\"]\n";
    let (ok, stdout, stderr) = check(named, &seed("").replace("[image_generation]", "[vision]"));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("config route `/v` requires vision"),
        "{stdout}"
    );
}
