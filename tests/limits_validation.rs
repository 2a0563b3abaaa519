//! The `limits` block of metadata entries (SPEC §8.1) and the 12-decimal-places rule for every cost
//! and price, through the real binary: `check --seed FILE` refuses each bad value with its field path
//! and reason (`error: FILE:LINE: FIELD.PATH: reason`), reports every problem of a file at once, and
//! counts the entries with limits in its summary.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_user-metadata-auth");

const ENTRY_PATH: &str = "consumers[0].plugins[0].config.metadata_list[0]";
const LIMITS_PATH: &str = "consumers[0].plugins[0].config.metadata_list[0].limits";

const MATRIX: &str = "{T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}";

/// A metadata entry in block YAML at the indentation of a `metadata_list` item, with the prices
/// of the seed example unless `fields` (extra lines, indented by the caller as entry fields) say
/// otherwise; a field given in `fields` replaces the default of the same name.
fn entry(id: &str, fields: &[&str]) -> String {
    let defaults = [
        "provider_name: kt".to_owned(),
        format!("tdl_matrix: {MATRIX}"),
        "capabilities: [1, 1, 0, 0, 0]".to_owned(),
        "max_input_tokens: 50000".to_owned(),
        "max_output_tokens: 20000".to_owned(),
        "input_cost_per_token: 0.00000005".to_owned(),
        "output_cost_per_token: 0.0000002".to_owned(),
    ];
    let named = |line: &str| line.split(':').next().unwrap_or_default().trim().to_owned();
    let mut out = format!("            - id: {id}\n");
    for line in defaults
        .iter()
        .filter(|d| !fields.iter().any(|f| named(f) == named(d)))
    {
        out.push_str(&format!("              {line}\n"));
    }
    for line in fields {
        out.push_str(&format!("              {line}\n"));
    }
    out
}

/// An entry whose `limits` block holds `lines` (each a field of the block).
fn entry_with_limits(id: &str, lines: &[&str]) -> String {
    let mut block = String::from("limits:");
    for line in lines {
        block.push_str("\n                ");
        block.push_str(line);
    }
    entry(id, &[&block])
}

/// A seed of consumers `u0`, `u1`, … (key `k<i>`), each with the list of its entries.
fn seed(consumers: &[Vec<String>]) -> String {
    let mut out = String::from("consumers:\n");
    for (i, entries) in consumers.iter().enumerate() {
        out.push_str(&format!(
            "  - username: u{i}\n    keyauth_credentials: [{{key: k{i}}}]\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n"
        ));
        for entry in entries {
            out.push_str(entry);
        }
    }
    out
}

fn one_entry(entry: String) -> String {
    seed(&[vec![entry]])
}

struct Checked {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Checked {
    /// The problem lines (`error: …`).
    fn problems(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect()
    }

    /// Asserts that a problem line names exactly `path` with exactly `reason`.
    fn assert_problem(&self, path: &str, reason: &str) {
        assert!(!self.ok, "check passed:\n{}", self.stdout);
        let wanted = format!(": {path}: {reason}");
        assert!(
            self.problems().iter().any(|l| l.ends_with(&wanted)),
            "no problem `{path}: {reason}` in:\n{}",
            self.stderr
        );
    }
}

fn check_in(dir: &Path, name: &str, text: &str) -> Checked {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the seed");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--seed")
        .arg(&path)
        .current_dir(dir)
        .output()
        .expect("run check");
    Checked {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(text: &str) -> Checked {
    let dir = tempfile::tempdir().expect("temp dir");
    check_in(dir.path(), "kong.yaml", text)
}

fn refused(text: &str, path: &str, reason: &str) {
    check(text).assert_problem(path, reason);
}

fn passes(text: &str) -> Checked {
    let out = check(text);
    assert!(out.ok, "check failed:\n{}\n{text}", out.stderr);
    out
}

// ---------------------------------------------------------------------------------------------

#[test]
fn request_and_token_counts_are_integers_of_at_most_15_digits() {
    for field in ["requests_per_minute", "requests_per_day", "tokens_per_day"] {
        let path = format!("{LIMITS_PATH}.{field}");
        for (value, reason) in [
            ("-1", "must be a number >= 0"),
            ("1.5", "must be an integer"),
            ("2e-1", "must be an integer"),
            ("\"60\"", "expected a number >= 0, found a string"),
            ("[60]", "expected a number >= 0, found a list"),
            // A field written without its number is a forgotten value, not "no limit".
            ("", "expected a number >= 0, found null"),
            ("1000000000000000", "must be at most 999999999999999"),
        ] {
            let text = one_entry(entry_with_limits("e", &[&format!("{field}: {value}")]));
            refused(&text, &path, reason);
        }
        // Integers written as numbers with a zero fraction or an exponent are integers; 0 is a limit.
        for value in ["0", "60", "1e3", "2.0", "999999999999999"] {
            passes(&one_entry(entry_with_limits(
                "e",
                &[&format!("{field}: {value}")],
            )));
        }
    }
}

#[test]
fn a_slot_map_names_only_t1_to_t12_with_integer_counts() {
    let slot = format!("{LIMITS_PATH}.requests_per_slot");
    let cases = [
        ("{T13: 5}", "T13", "unexpected key `T13` (only T1..T12)"),
        ("{T0: 5}", "T0", "unexpected key `T0` (only T1..T12)"),
        ("{T07: 5}", "T07", "unexpected key `T07` (only T1..T12)"),
        ("{t7: 5}", "t7", "unexpected key `t7` (only T1..T12)"),
        ("{T3: -1}", "T3", "must be a number >= 0"),
        ("{T3: 2.5}", "T3", "must be an integer"),
        ("{T3: many}", "T3", "expected a number >= 0, found a string"),
        ("{T3: null}", "T3", "expected a number >= 0, found null"),
        (
            "{T12: 1000000000000000}",
            "T12",
            "must be at most 999999999999999",
        ),
    ];
    for (map, key, reason) in cases {
        let text = one_entry(entry_with_limits(
            "e",
            &[&format!("requests_per_slot: {map}")],
        ));
        refused(&text, &format!("{slot}.{key}"), reason);
    }
    passes(&one_entry(entry_with_limits(
        "e",
        &["requests_per_slot: {T1: 0, T7: 5, T12: 100}"],
    )));
}

#[test]
fn a_count_for_every_slot_is_an_integer() {
    let slot = format!("{LIMITS_PATH}.requests_per_slot");
    for (value, reason) in [
        ("-5", "must be a number >= 0"),
        ("0.5", "must be an integer"),
        (
            "all",
            "expected an integer >= 0 or a mapping of T1..T12 to integers, found a string",
        ),
        (
            "[1, 2]",
            "expected an integer >= 0 or a mapping of T1..T12 to integers, found a list",
        ),
        (
            "",
            "expected an integer >= 0 or a mapping of T1..T12 to integers, found null",
        ),
    ] {
        let text = one_entry(entry_with_limits(
            "e",
            &[&format!("requests_per_slot: {value}")],
        ));
        refused(&text, &slot, reason);
    }
    passes(&one_entry(entry_with_limits(
        "e",
        &["requests_per_slot: 100"],
    )));
}

#[test]
fn cost_budgets_have_at_most_12_decimal_places_and_15_integer_digits() {
    for field in ["cost_per_day", "cost_per_month"] {
        let path = format!("{LIMITS_PATH}.{field}");
        for (value, reason) in [
            ("0.0000000000001", "must have at most 12 decimal places"),
            ("1e-13", "must have at most 12 decimal places"),
            ("5.0000000000005", "must have at most 12 decimal places"),
            ("-1", "must be a number >= 0"),
            ("-0.5", "must be a number >= 0"),
            ("\"5\"", "expected a number >= 0, found a string"),
            ("", "expected a number >= 0, found null"),
            ("1000000000000000", "must be at most 999999999999999"),
            ("1e15", "must be at most 999999999999999"),
            (
                "999999999999999.000000000001",
                "must be at most 999999999999999",
            ),
        ] {
            let text = one_entry(entry_with_limits("e", &[&format!("{field}: {value}")]));
            refused(&text, &path, reason);
        }
        // Places are those of the value: trailing zeros do not count.
        for value in [
            "0",
            "5",
            "0.000000000001",
            "1e-12",
            "0.10000000000000000",
            "999999999999999",
        ] {
            passes(&one_entry(entry_with_limits(
                "e",
                &[&format!("{field}: {value}")],
            )));
        }
    }
}

#[test]
fn prices_have_at_most_12_decimal_places_too() {
    for field in ["input_cost_per_token", "output_cost_per_token"] {
        let path = format!("{ENTRY_PATH}.{field}");
        for (value, reason) in [
            ("0.0000000000001", "must have at most 12 decimal places"),
            ("5e-13", "must have at most 12 decimal places"),
            ("1000000000000000", "must be at most 999999999999999"),
            ("-0.00000005", "must be a number >= 0"),
        ] {
            let text = one_entry(entry("e", &[&format!("{field}: {value}")]));
            refused(&text, &path, reason);
        }
        for value in ["0.000000000001", "1.5e-7", "6.0e-05", "2.0"] {
            passes(&one_entry(entry("e", &[&format!("{field}: {value}")])));
        }
    }
}

#[test]
fn unknown_fields_in_limits_are_refused() {
    for field in ["requests_per_hour", "cost_per_year", "Requests_per_minute"] {
        let text = one_entry(entry_with_limits(
            "e",
            &["requests_per_minute: 60", &format!("{field}: 5")],
        ));
        refused(
            &text,
            &format!("{LIMITS_PATH}.{field}"),
            &format!("unknown field `{field}`"),
        );
    }
}

#[test]
fn limits_must_be_a_mapping() {
    for (value, found) in [("5", "a number"), ("[60]", "a list"), ("none", "a string")] {
        let text = one_entry(entry("e", &[&format!("limits: {value}")]));
        refused(
            &text,
            LIMITS_PATH,
            &format!("expected a mapping, found {found}"),
        );
    }
}

#[test]
fn empty_or_null_limits_mean_no_limits() {
    for block in [
        "limits: {}",
        "limits: null",
        "limits:",
        "limits: {requests_per_slot: {}}",
    ] {
        let out = passes(&one_entry(entry("e", &[block])));
        assert!(
            out.stdout
                .contains("1 consumers, 1 keys, 1 metadata entries (0 with limits), "),
            "{block}: {}",
            out.stdout
        );
    }
}

#[test]
fn a_seed_with_every_field_passes_and_the_summary_counts_entries_with_limits() {
    let full = entry_with_limits(
        "full",
        &[
            "requests_per_minute: 60",
            "requests_per_slot: {T1: 10, T7: 5}",
            "requests_per_day: 1000",
            "tokens_per_day: 2000000",
            "cost_per_day: 5",
            "cost_per_month: 100.000000000001",
        ],
    );
    let every_slot = entry_with_limits("every-slot", &["requests_per_slot: 100"]);
    let text = seed(&[
        vec![full, entry("plain", &[])],
        vec![
            every_slot,
            entry("zero", &["limits: {requests_per_day: 0}"]),
        ],
    ]);
    let out = passes(&text);
    assert!(
        out.stdout
            .contains("ok: 2 consumers, 2 keys, 4 metadata entries (3 with limits), "),
        "{}",
        out.stdout
    );
}

#[test]
fn a_json_seed_is_held_to_the_same_rules() {
    let matrix = (1..=12)
        .map(|i| format!("\"T{i}\":[0]"))
        .collect::<Vec<_>>()
        .join(",");
    let json = |limits: &str| {
        format!(
            r#"{{"consumers":[{{"username":"u0","keyauth_credentials":[{{"key":"k0"}}],"plugins":[{{"name":"user-metadata","config":{{"metadata_list":[{{"id":"e","provider_name":"kt","tdl_matrix":{{{matrix}}},"capabilities":[1],"max_input_tokens":1,"max_output_tokens":1,"input_cost_per_token":5e-08,"output_cost_per_token":0.0000002,"limits":{limits}}}]}}}}]}}]}}"#
        )
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let good = check_in(
        dir.path(),
        "kong.json",
        &json(r#"{"requests_per_slot":{"T2":3},"cost_per_day":0.000000000001}"#),
    );
    assert!(good.ok, "{}", good.stderr);
    assert!(good.stdout.contains("(1 with limits)"), "{}", good.stdout);
    // JSON numbers are read from their text, so 13 places are seen as 13, not rounded by f64.
    let bad = check_in(
        dir.path(),
        "kong.json",
        &json(r#"{"requests_per_slot":{"T13":3},"cost_per_day":0.0000000000001}"#),
    );
    bad.assert_problem(
        &format!("{LIMITS_PATH}.requests_per_slot.T13"),
        "unexpected key `T13` (only T1..T12)",
    );
    bad.assert_problem(
        &format!("{LIMITS_PATH}.cost_per_day"),
        "must have at most 12 decimal places",
    );
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let first = entry(
        "first",
        &[
            "input_cost_per_token: 1e-13",
            "limits:\n                requests_per_minute: -1\n                requests_per_slot: {T13: 1, T2: 1.5}\n                tokens_per_day:\n                cost_per_day: 0.0000000000001\n                cost_per_month: 1e15\n                foo: 1",
        ],
    );
    let second = entry_with_limits("second", &["requests_per_day: 2.5"]);
    let other = entry_with_limits("other", &["requests_per_slot: all"]);
    let text = seed(&[vec![first, second], vec![other]]);
    let out = check(&text);
    let list0 = "consumers[0].plugins[0].config.metadata_list";
    let expected = [
        (
            format!("{list0}[0].input_cost_per_token"),
            "must have at most 12 decimal places",
        ),
        (format!("{list0}[0].limits.foo"), "unknown field `foo`"),
        (
            format!("{list0}[0].limits.requests_per_minute"),
            "must be a number >= 0",
        ),
        (
            format!("{list0}[0].limits.requests_per_slot.T13"),
            "unexpected key `T13` (only T1..T12)",
        ),
        (
            format!("{list0}[0].limits.requests_per_slot.T2"),
            "must be an integer",
        ),
        (
            format!("{list0}[0].limits.tokens_per_day"),
            "expected a number >= 0, found null",
        ),
        (
            format!("{list0}[0].limits.cost_per_day"),
            "must have at most 12 decimal places",
        ),
        (
            format!("{list0}[0].limits.cost_per_month"),
            "must be at most 999999999999999",
        ),
        (
            format!("{list0}[1].limits.requests_per_day"),
            "must be an integer",
        ),
        (
            "consumers[1].plugins[0].config.metadata_list[0].limits.requests_per_slot".to_owned(),
            "expected an integer >= 0 or a mapping of T1..T12 to integers, found a string",
        ),
    ];
    for (path, reason) in &expected {
        out.assert_problem(path, reason);
    }
    assert_eq!(out.problems().len(), expected.len(), "{}", out.stderr);
}

#[test]
fn a_problem_names_the_line_of_the_bad_value() {
    let text = one_entry(entry_with_limits(
        "e",
        &["requests_per_minute: 60", "requests_per_day: -3"],
    ));
    let line = text
        .lines()
        .position(|l| l.contains("requests_per_day: -3"))
        .map(|i| i + 1)
        .expect("the line is in the seed");
    let out = check(&text);
    out.assert_problem(
        &format!("{LIMITS_PATH}.requests_per_day"),
        "must be a number >= 0",
    );
    assert!(
        out.problems()
            .iter()
            .any(|l| l.contains(&format!("kong.yaml:{line}: {LIMITS_PATH}.requests_per_day"))),
        "{}",
        out.stderr
    );
}
