//! Writes a large seed file for the benchmarks: `cargo run --release --example gen_seed -- N FILE`
//! (YAML, or Kong's JSON form when FILE ends in `.json`).
//!
//! N consumers `bench-consumer-<i>` with key `bench-key-<i>` (so a load generator can spread calls
//! over all of them), one ACL group each, and every tenth with a metadata list of its own (the
//! others use the global list, as Kong consumers without their own plugin would). The bundled
//! seed's routes are kept so the bundled config's pins and ACLs apply. With `ROUTES=M` in the
//! environment (JSON only), M more routes `/bench-route-<j>/chat` stand under a service whose
//! `acl` and `key-auth` apply to them, beside a global `acl`: a Kong file with its placements.

use std::fmt::Write as _;
use std::io::Write as _;

fn entry(out: &mut String, indent: &str, id: &str, provider: &str) {
    let row = "[0, 0, 0, 0, 0, 3, 0, 0, 0, 0]";
    let _ = writeln!(out, "{indent}- id: \"{id}\"");
    let _ = writeln!(out, "{indent}  provider_name: \"{provider}\"");
    let _ = writeln!(out, "{indent}  tags: [\"{provider}\", \"bench\"]");
    let matrix: Vec<String> = (1..=12).map(|t| format!("T{t}: {row}")).collect();
    let _ = writeln!(out, "{indent}  tdl_matrix: {{{}}}", matrix.join(", "));
    let _ = writeln!(out, "{indent}  capabilities: [1, 1, 0, 0, 0]");
    let _ = writeln!(out, "{indent}  max_input_tokens: 50000");
    let _ = writeln!(out, "{indent}  max_output_tokens: 20000");
    let _ = writeln!(out, "{indent}  input_cost_per_token: 0.00000005");
    let _ = writeln!(out, "{indent}  output_cost_per_token: 0.0000002");
}

fn json_entry(id: &str, provider: &str) -> serde_json::Value {
    let row = serde_json::json!([0, 0, 0, 0, 0, 3, 0, 0, 0, 0]);
    let matrix: serde_json::Map<String, serde_json::Value> =
        (1..=12).map(|t| (format!("T{t}"), row.clone())).collect();
    serde_json::json!({
        "id": id, "provider_name": provider, "tags": [provider, "bench"], "tdl_matrix": matrix,
        "capabilities": [1, 1, 0, 0, 0], "max_input_tokens": 50000, "max_output_tokens": 20000,
        "input_cost_per_token": 0.00000005, "output_cost_per_token": 0.0000002,
    })
}

/// The same seed as Kong's JSON declarative format.
fn json_seed(count: usize) -> String {
    let plugin = |entries: Vec<serde_json::Value>| serde_json::json!([{"name": "user-metadata", "config": {"metadata_list": entries}}]);
    let consumers: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let group = if i % 2 == 0 { "midm-allowed" } else { "openai-allowed" };
            let mut consumer = serde_json::json!({
                "username": format!("bench-consumer-{i}"), "custom_id": format!("bench-{i}"),
                "keyauth_credentials": [{"key": format!("bench-key-{i}")}], "acls": [{"group": group}],
            });
            if i % 10 == 0 {
                consumer["plugins"] = plugin(vec![json_entry("kt-midm-base", "kt")]);
            }
            consumer
        })
        .collect();
    let route = |name: &str, path: &str, group: &str| serde_json::json!({"name": name, "paths": [path], "plugins": [{"name": "acl", "config": {"allow": [group]}}]});
    let extra_routes: usize = std::env::var("ROUTES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let service_routes: Vec<serde_json::Value> = (0..extra_routes)
        .map(|j| serde_json::json!({"name": format!("bench-route-{j}"), "paths": [format!("/bench-route-{j}/chat")], "methods": ["GET", "POST"]}))
        .collect();
    let both = ["midm-allowed", "openai-allowed"];
    let mut plugins = plugin(vec![
        json_entry("kt-midm-base", "kt"),
        json_entry("azure-gpt4o", "azure"),
    ]);
    if extra_routes > 0
        && let Some(list) = plugins.as_array_mut()
    {
        list.push(serde_json::json!({"name": "acl", "config": {"allow": both}}));
    }
    serde_json::json!({
        "_format_version": "3.0",
        "consumers": consumers,
        "services": [{"name": "bench-svc", "url": "http://upstream", "routes": service_routes, "plugins": [
            {"name": "acl", "config": {"allow": both}},
            {"name": "key-auth", "config": {"key_names": ["apikey"]}},
        ]}],
        "routes": [route("midm", "/midm-base/chat", "midm-allowed"), route("gpt4o", "/gpt4o/chat", "openai-allowed")],
        "plugins": plugins,
    })
    .to_string()
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let path = args.get(2).map_or("target/bench-seed.yaml", String::as_str);
    let mut out = String::with_capacity(count * 400);
    out.push_str("_format_version: \"3.0\"\nconsumers:\n");
    for i in 0..count {
        let group = if i % 2 == 0 {
            "midm-allowed"
        } else {
            "openai-allowed"
        };
        let _ = writeln!(
            out,
            "  - username: \"bench-consumer-{i}\"\n    custom_id: \"bench-{i}\""
        );
        let _ = writeln!(
            out,
            "    keyauth_credentials: [{{key: \"bench-key-{i}\"}}]\n    acls: [{{group: \"{group}\"}}]"
        );
        if i % 10 == 0 {
            out.push_str("    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n");
            entry(&mut out, "            ", "kt-midm-base", "kt");
        }
    }
    out.push_str("routes:\n");
    for (name, path, group) in [
        ("midm", "/midm-base/chat", "midm-allowed"),
        ("gpt4o", "/gpt4o/chat", "openai-allowed"),
    ] {
        let _ = writeln!(
            out,
            "  - name: {name}\n    paths: [{path}]\n    plugins:\n      - name: acl\n        config: {{allow: [{group}]}}"
        );
    }
    out.push_str("plugins:\n  - name: user-metadata\n    config:\n      metadata_list:\n");
    entry(&mut out, "        ", "kt-midm-base", "kt");
    entry(&mut out, "        ", "azure-gpt4o", "azure");
    if path.ends_with(".json") {
        out = json_seed(count);
    }
    std::fs::File::create(path)?.write_all(out.as_bytes())?;
    eprintln!("wrote {count} consumers to {path} ({} bytes)", out.len());
    Ok(())
}
