//! Seed validation through the real binary (SPEC §2 and §3): `check` (and `serve`) must reject every
//! invalid seed with `error: FILE:LINE: FIELD.PATH: reason` lines, one per problem, and exit 1.
//!
//! Each test starts from a valid seed built by [`Consumer`] / [`Entry`] and changes one thing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_user-metadata-auth");

const ENTRY_PATH: &str = "consumers[0].plugins[0].config.metadata_list[0]";

// ---------------------------------------------------------------------------------------------
// Seed builder
// ---------------------------------------------------------------------------------------------

/// A field value: inline YAML text, or a block mapping of inline values (the TDL matrix).
#[derive(Clone)]
enum Val {
    Inline(String),
    Block(Vec<(String, String)>),
}

/// One `metadata_list` entry, fields in order.
#[derive(Clone)]
struct Entry {
    fields: Vec<(String, Val)>,
}

impl Entry {
    /// A valid entry with a full T1..T12 matrix; every row is distinct (`[0, <slot>, 2, 0]`).
    fn valid(id: &str) -> Entry {
        let matrix = (1..=12)
            .map(|i| (format!("T{i}"), format!("[0, {i}, 2, 0]")))
            .collect();
        let inline = |k: &str, v: &str| (k.to_owned(), Val::Inline(v.to_owned()));
        Entry {
            fields: vec![
                inline("id", &format!("\"{id}\"")),
                inline("provider_name", "\"kt\""),
                inline("tags", "[\"kt\", \"믿음\"]"),
                ("tdl_matrix".to_owned(), Val::Block(matrix)),
                inline("capabilities", "[1, 1, 0, 0, 0]"),
                inline("max_input_tokens", "50000"),
                inline("max_output_tokens", "20000"),
                inline("input_cost_per_token", "0.00000005"),
                inline("output_cost_per_token", "0.0000002"),
            ],
        }
    }

    /// Replaces `field`'s value (inline YAML), or appends the field.
    fn set(mut self, field: &str, yaml: &str) -> Entry {
        let value = Val::Inline(yaml.to_owned());
        match self.fields.iter_mut().find(|(k, _)| k == field) {
            Some((_, v)) => *v = value,
            None => self.fields.push((field.to_owned(), value)),
        }
        self
    }

    fn without(mut self, field: &str) -> Entry {
        let before = self.fields.len();
        self.fields.retain(|(k, _)| k != field);
        assert_eq!(self.fields.len() + 1, before, "no field {field}");
        self
    }

    fn matrix(&mut self) -> &mut Vec<(String, String)> {
        self.fields
            .iter_mut()
            .find_map(|(k, v)| match v {
                Val::Block(rows) if k == "tdl_matrix" => Some(rows),
                _ => None,
            })
            .expect("the entry has a block tdl_matrix")
    }

    /// Replaces a matrix row, or appends a row under a new key.
    fn set_row(mut self, key: &str, yaml: &str) -> Entry {
        let rows = self.matrix();
        match rows.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = yaml.to_owned(),
            None => rows.push((key.to_owned(), yaml.to_owned())),
        }
        self
    }

    fn without_row(mut self, key: &str) -> Entry {
        let rows = self.matrix();
        let before = rows.len();
        rows.retain(|(k, _)| k != key);
        assert_eq!(rows.len() + 1, before, "no row {key}");
        self
    }

    /// Writes the entry as a block sequence item whose `- ` stands at `indent`.
    fn render(&self, out: &mut String, indent: usize) {
        for (i, (key, value)) in self.fields.iter().enumerate() {
            let pad = if i == 0 {
                format!("{}- ", " ".repeat(indent))
            } else {
                " ".repeat(indent + 2)
            };
            match value {
                Val::Inline(v) => writeln!(out, "{pad}{key}: {v}").unwrap(),
                Val::Block(rows) => {
                    writeln!(out, "{pad}{key}:").unwrap();
                    for (k, v) in rows {
                        writeln!(out, "{}{k}: {v}", " ".repeat(indent + 4)).unwrap();
                    }
                }
            }
        }
    }
}

/// One consumer with credentials, ACL groups and a `user-metadata` plugin.
#[derive(Clone)]
struct Consumer {
    /// `username`, `custom_id`, consumer `tags`, … as inline YAML, in order.
    fields: Vec<(String, String)>,
    /// Each credential's lines, e.g. `key: "..."` or `key_sha256: ...`.
    credentials: Vec<String>,
    /// ACL group values (inline YAML).
    groups: Vec<String>,
    /// Raw plugin items written before `user-metadata` (indented as list items under `plugins:`).
    other_plugins: Vec<String>,
    /// Extra `key: value` lines in the `user-metadata` config.
    config_extra: Vec<String>,
    entries: Vec<Entry>,
}

impl Consumer {
    /// A valid consumer `name` with key `<name>-secret-key-0001`, group `<name>-group` and one
    /// entry `<name>-entry`.
    fn valid(name: &str) -> Consumer {
        Consumer {
            fields: vec![
                ("username".to_owned(), format!("\"{name}\"")),
                ("custom_id".to_owned(), format!("\"{name}-id\"")),
            ],
            credentials: vec![format!("key: \"{}\"", plain_key(name))],
            groups: vec![format!("\"{name}-group\"")],
            other_plugins: Vec::new(),
            config_extra: Vec::new(),
            entries: vec![Entry::valid(&format!("{name}-entry"))],
        }
    }

    fn set(mut self, field: &str, yaml: &str) -> Consumer {
        match self.fields.iter_mut().find(|(k, _)| k == field) {
            Some((_, v)) => *v = yaml.to_owned(),
            None => self.fields.push((field.to_owned(), yaml.to_owned())),
        }
        self
    }

    fn without(mut self, field: &str) -> Consumer {
        let before = self.fields.len();
        self.fields.retain(|(k, _)| k != field);
        assert_eq!(self.fields.len() + 1, before, "no field {field}");
        self
    }

    fn entries(mut self, entries: Vec<Entry>) -> Consumer {
        self.entries = entries;
        self
    }

    fn entry(self, entry: Entry) -> Consumer {
        self.entries(vec![entry])
    }

    fn render(&self, out: &mut String) {
        for (i, (key, value)) in self.fields.iter().enumerate() {
            let pad = if i == 0 { "  - " } else { "    " };
            writeln!(out, "{pad}{key}: {value}").unwrap();
        }
        if !self.credentials.is_empty() {
            out.push_str("    keyauth_credentials:\n");
            for credential in &self.credentials {
                writeln!(out, "      - {credential}").unwrap();
            }
        }
        if !self.groups.is_empty() {
            out.push_str("    acls:\n");
            for group in &self.groups {
                writeln!(out, "      - group: {group}").unwrap();
            }
        }
        out.push_str("    plugins:\n");
        for plugin in &self.other_plugins {
            out.push_str(plugin);
        }
        out.push_str("      - name: user-metadata\n        config:\n");
        for extra in &self.config_extra {
            writeln!(out, "          {extra}").unwrap();
        }
        out.push_str("          metadata_list:\n");
        for entry in &self.entries {
            entry.render(out, 12);
        }
    }
}

fn plain_key(name: &str) -> String {
    format!("{name}-secret-key-0001")
}

/// A seed document: `head` (top-level sections before), the consumers, `tail` (sections after).
fn seed(head: &str, consumers: &[Consumer], tail: &str) -> String {
    let mut out = String::from(head);
    out.push_str("consumers:\n");
    for consumer in consumers {
        consumer.render(&mut out);
    }
    out.push_str(tail);
    out
}

fn consumers(consumers: &[Consumer]) -> String {
    seed("", consumers, "")
}

/// 1-based numbers of the lines containing `needle`.
fn lines_of(text: &str, needle: &str) -> Vec<usize> {
    let found: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert!(!found.is_empty(), "`{needle}` is not in the seed:\n{text}");
    found
}

/// The single line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let found = lines_of(text, needle);
    assert_eq!(found.len(), 1, "`{needle}` is on lines {found:?}:\n{text}");
    found[0]
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// The binary without any `UMA_` variable of the test's environment.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("UMA_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd.stdin(Stdio::null());
    cmd
}

struct Files {
    _dir: tempfile::TempDir,
    config: PathBuf,
    seed: PathBuf,
}

/// Writes `seed_text` and a minimal embedded-mode config whose `[seed] path` is that seed.
fn write_files(seed_text: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.yaml");
    std::fs::write(&seed, seed_text).unwrap();
    let config = dir.path().join("uma.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[redis]\nurl = \"\"\n[seed]\npath = {:?}\n",
            seed.display().to_string()
        ),
    )
    .unwrap();
    Files {
        _dir: dir,
        config,
        seed,
    }
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// The seed file as the binary names it.
    file: String,
}

impl Outcome {
    fn errors(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect()
    }

    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Some problem line is exactly `error: FILE:LINE: PATH: <reason containing `reason`>`, with
    /// LINE one of `lines`.
    fn assert_problem_at(&self, lines: &[usize], path: &str, reason: &str) {
        let found = self.errors().into_iter().any(|l| {
            lines.iter().any(|line| {
                l.strip_prefix(&format!("error: {}:{line}: {path}: ", self.file))
                    .is_some_and(|rest| rest.contains(reason))
            })
        });
        assert!(
            found,
            "expected `error: {}:{lines:?}: {path}: …{reason}…`\n{}",
            self.file,
            self.show()
        );
    }

    fn assert_problem(&self, line: usize, path: &str, reason: &str) {
        self.assert_problem_at(&[line], path, reason);
    }

    fn assert_problem_count(&self, n: usize) {
        assert_eq!(self.errors().len(), n, "{}", self.show());
        assert!(
            self.stderr.contains(&format!("{n} problem(s) found")),
            "{}",
            self.show()
        );
    }
}

fn output_of(out: Output, file: &Path) -> Outcome {
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        file: file.display().to_string(),
    }
}

/// `check --config <cfg> --seed <seed>`.
fn check(seed_text: &str) -> Outcome {
    let files = write_files(seed_text);
    let out = command()
        .arg("check")
        .arg("--config")
        .arg(&files.config)
        .arg("--seed")
        .arg(&files.seed)
        .output()
        .unwrap();
    output_of(out, &files.seed)
}

/// `check` must fail with status 1, print no summary and at least one `error:` line.
fn check_fails(seed_text: &str) -> Outcome {
    let out = check(seed_text);
    assert_eq!(out.code, Some(1), "seed:\n{seed_text}\n{}", out.show());
    assert!(!out.stdout.contains("ok:"), "{}", out.show());
    assert!(!out.errors().is_empty(), "{}", out.show());
    out
}

/// `check` must pass with status 0 and print the summary.
fn check_passes(seed_text: &str) -> Outcome {
    let out = check(seed_text);
    assert_eq!(out.code, Some(0), "seed:\n{seed_text}\n{}", out.show());
    assert!(out.stdout.starts_with("ok: "), "{}", out.show());
    assert!(out.errors().is_empty(), "{}", out.show());
    out
}

fn hash_key(key: &str) -> String {
    let out = command().arg("hash-key").arg(key).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let hex = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(hex.len(), 64, "{hex}");
    hex
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn the_builders_valid_seed_passes() {
    let text = consumers(&[
        Consumer::valid("user1").entries(vec![Entry::valid("a"), Entry::valid("b")]),
        Consumer::valid("user2"),
    ]);
    let out = check_passes(&text);
    assert!(
        out.stdout
            .contains("2 consumers, 2 keys, 3 metadata entries"),
        "{}",
        out.show()
    );
}

#[test]
fn missing_username_is_reported() {
    // The consumer now starts with `custom_id`, the line the problem is reported on.
    let text = consumers(&[Consumer::valid("user1").without("username")]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "custom_id: \"user1-id\""),
        "consumers[0].username",
        "required field is missing",
    );
    out.assert_problem_count(1);
}

#[test]
fn missing_required_entry_fields_are_reported() {
    for field in [
        "id",
        "provider_name",
        "tdl_matrix",
        "capabilities",
        "max_input_tokens",
        "max_output_tokens",
        "input_cost_per_token",
        "output_cost_per_token",
    ] {
        // The faulty entry is the second of the list, so the index in the path counts.
        let text = consumers(&[Consumer::valid("user1").entries(vec![
            Entry::valid("first"),
            Entry::valid("second").without(field),
        ])]);
        let out = check_fails(&text);
        // The entry's line is that of its first field (`- id:`, or `- provider_name:` without id).
        let first_line = if field == "id" {
            line_of(&text, "- provider_name:")
        } else {
            line_of(&text, "- id: \"second\"")
        };
        out.assert_problem(
            first_line,
            &format!("consumers[0].plugins[0].config.metadata_list[1].{field}"),
            "required field is missing",
        );
        out.assert_problem_count(1);
    }
}

#[test]
fn a_null_required_field_counts_as_missing() {
    let text = consumers(&[Consumer::valid("user1").entry(Entry::valid("e").set("id", "~"))]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "- id: ~"),
        &format!("{ENTRY_PATH}.id"),
        "required field is missing",
    );
}

#[test]
fn tdl_matrix_without_a_slot_is_reported() {
    let text = consumers(&[Consumer::valid("user1").entry(Entry::valid("e").without_row("T7"))]);
    let out = check_fails(&text);
    // The matrix's line: its key, or its first row (where the block mapping starts).
    let lines = [line_of(&text, "tdl_matrix:"), line_of(&text, "T1: ")];
    out.assert_problem_at(&lines, &format!("{ENTRY_PATH}.tdl_matrix"), "missing T7");
    assert!(
        out.errors()
            .iter()
            .any(|l| l.ends_with(".tdl_matrix: missing T7")),
        "{}",
        out.show()
    );
    out.assert_problem_count(1);
}

#[test]
fn tdl_matrix_with_a_null_slot_is_reported() {
    // `T7:` with nothing after it is not an array of numbers: a forgotten row must not pass as `[]`.
    let text = consumers(&[Consumer::valid("user1").entry(Entry::valid("e").set_row("T7", ""))]);
    let out = check_fails(&text);
    let row_line = line_of(&text, "T7:");
    let lines = [
        line_of(&text, "tdl_matrix:"),
        line_of(&text, "T1: "),
        row_line,
    ];
    let matrix = format!("{ENTRY_PATH}.tdl_matrix");
    let found = out.errors().iter().any(|l| {
        lines.iter().any(|line| {
            let prefix = format!("error: {}:{line}: ", out.file);
            l.strip_prefix(&prefix).is_some_and(|rest| {
                rest.starts_with(&format!("{matrix}.T7: "))
                    || (rest.starts_with(&format!("{matrix}: ")) && rest.contains("T7"))
            })
        })
    });
    assert!(found, "{}", out.show());
    out.assert_problem_count(1);
}

#[test]
fn tdl_matrix_with_another_key_is_reported() {
    for key in ["T13", "t1", "T0", "T01", "slot"] {
        let text = consumers(&[
            Consumer::valid("user1").entry(Entry::valid("e").set_row(key, "[9, 9, 9]"))
        ]);
        let out = check_fails(&text);
        out.assert_problem(
            line_of(&text, &format!("{key}: [9, 9, 9]")),
            &format!("{ENTRY_PATH}.tdl_matrix"),
            &format!("`{key}`"),
        );
        out.assert_problem_count(1);
    }
}

#[test]
fn negative_numbers_are_reported() {
    let cases: [(Entry, &str, &str); 6] = [
        (
            Entry::valid("e").set_row("T3", "[0, 3, -1, 0]"),
            "T3: [0, 3, -1, 0]",
            "tdl_matrix.T3[2]",
        ),
        (
            Entry::valid("e").set_row("T12", "[0, -0.5]"),
            "T12: [0, -0.5]",
            "tdl_matrix.T12[1]",
        ),
        (
            Entry::valid("e").set("max_input_tokens", "-1"),
            "max_input_tokens: -1",
            "max_input_tokens",
        ),
        (
            Entry::valid("e").set("max_output_tokens", "-20000"),
            "max_output_tokens: -20000",
            "max_output_tokens",
        ),
        (
            Entry::valid("e").set("input_cost_per_token", "-0.00000005"),
            "input_cost_per_token: -0.00000005",
            "input_cost_per_token",
        ),
        (
            Entry::valid("e").set("output_cost_per_token", "-2e-7"),
            "output_cost_per_token: -2e-7",
            "output_cost_per_token",
        ),
    ];
    for (entry, needle, field) in cases {
        let text = consumers(&[Consumer::valid("user1").entry(entry)]);
        let out = check_fails(&text);
        out.assert_problem(
            line_of(&text, needle),
            &format!("{ENTRY_PATH}.{field}"),
            ">= 0",
        );
        out.assert_problem_count(1);
    }
}

#[test]
fn capabilities_other_than_0_or_1_are_reported() {
    for (value, index) in [
        ("[1, 2, 0]", 1),
        ("[-1, 0]", 0),
        ("[0, 0, 0.5]", 2),
        ("[1, true]", 1),
        ("[\"1\"]", 0),
    ] {
        let text = consumers(&[
            Consumer::valid("user1").entry(Entry::valid("e").set("capabilities", value))
        ]);
        let out = check_fails(&text);
        out.assert_problem(
            line_of(&text, &format!("capabilities: {value}")),
            &format!("{ENTRY_PATH}.capabilities[{index}]"),
            "must be 0 or 1",
        );
        out.assert_problem_count(1);
    }
}

#[test]
fn duplicate_usernames_are_reported() {
    let text = consumers(&[
        Consumer::valid("user1"),
        Consumer::valid("user2").set("username", "\"user1\""),
    ]);
    let out = check_fails(&text);
    out.assert_problem(
        lines_of(&text, "username: \"user1\"")[1],
        "consumers[1].username",
        "duplicate username",
    );
    out.assert_problem_count(1);
}

#[test]
fn duplicate_keys_across_consumers_are_reported_without_the_key() {
    let key = plain_key("user1");
    // The same plain key twice.
    let mut second = Consumer::valid("user2");
    second.credentials = vec![format!("key: \"{key}\"")];
    let text = consumers(&[Consumer::valid("user1"), second]);
    let out = check_fails(&text);
    out.assert_problem(
        lines_of(&text, &key)[1],
        "consumers[1].keyauth_credentials[0]",
        "duplicate API key",
    );
    out.assert_problem_count(1);
    assert!(!out.stderr.contains(&key), "{}", out.show());
    assert!(!out.stdout.contains(&key), "{}", out.show());

    // A plain key and the stored form of the same key (upper- and lower-case hex).
    let hex = hash_key(&key);
    for hex in [hex.clone(), hex.to_uppercase()] {
        let mut second = Consumer::valid("user2");
        second.credentials = vec![
            format!("key: \"{}\"", plain_key("user2")),
            format!("key_sha256: \"{hex}\""),
        ];
        let text = consumers(&[Consumer::valid("user1"), second]);
        let out = check_fails(&text);
        out.assert_problem(
            line_of(&text, &hex),
            "consumers[1].keyauth_credentials[1]",
            "duplicate API key",
        );
        out.assert_problem_count(1);
        assert!(!out.stderr.contains(&key), "{}", out.show());
        assert!(!out.stdout.contains(&key), "{}", out.show());
    }

    // The stored form first, the plain key second.
    let mut first = Consumer::valid("user1");
    first.credentials = vec![format!("key_sha256: {hex}")];
    let mut second = Consumer::valid("user2");
    second.credentials = vec![format!("key: \"{key}\"")];
    let text = consumers(&[first, second]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, &key),
        "consumers[1].keyauth_credentials[0]",
        "duplicate API key",
    );
    assert!(!out.stderr.contains(&key), "{}", out.show());
    assert!(!out.stdout.contains(&key), "{}", out.show());
}

#[test]
fn different_keys_with_sha256_pass() {
    let mut second = Consumer::valid("user2");
    second.credentials = vec![format!("key_sha256: {}", hash_key(&plain_key("user2")))];
    let out = check_passes(&consumers(&[Consumer::valid("user1"), second]));
    assert!(out.stdout.contains("2 consumers, 2 keys"), "{}", out.show());
}

#[test]
fn duplicate_entry_ids_within_one_list_are_reported() {
    let text = consumers(&[Consumer::valid("user1").entries(vec![
        Entry::valid("same"),
        Entry::valid("other"),
        Entry::valid("same").set("provider_name", "\"azure\""),
    ])]);
    let out = check_fails(&text);
    out.assert_problem(
        lines_of(&text, "- id: \"same\"")[1],
        "consumers[0].plugins[0].config.metadata_list[2].id",
        "duplicate entry id `same`",
    );
    out.assert_problem_count(1);
}

#[test]
fn the_same_entry_id_in_two_lists_is_fine() {
    let text = consumers(&[
        Consumer::valid("user1").entry(Entry::valid("shared")),
        Consumer::valid("user2").entry(Entry::valid("shared")),
    ]);
    let out = check_passes(&text);
    assert!(out.stdout.contains("2 consumers"), "{}", out.show());
}

#[test]
fn control_characters_in_header_strings_are_reported() {
    for escape in ["\\n", "\\r", "\\0", "\\t", "\\x7f", "\\e"] {
        // A double-quoted YAML string holding the escape, unique per field.
        let bad = |field: &str| format!("\"{field}{escape}x\"");
        let mut with_group = Consumer::valid("user1");
        with_group.groups = vec![bad("group")];
        let entry = |e: Entry| Consumer::valid("user1").entry(e);
        let cases = [
            (
                Consumer::valid("user1").set("username", &bad("username")),
                "consumers[0].username".to_owned(),
            ),
            (
                Consumer::valid("user1").set("custom_id", &bad("custom_id")),
                "consumers[0].custom_id".to_owned(),
            ),
            (with_group, "consumers[0].acls[0].group".to_owned()),
            (
                entry(Entry::valid("e").set("id", &bad("id"))),
                format!("{ENTRY_PATH}.id"),
            ),
            (
                entry(Entry::valid("e").set("provider_name", &bad("provider_name"))),
                format!("{ENTRY_PATH}.provider_name"),
            ),
            (
                entry(Entry::valid("e").set("tags", &format!("[\"kt\", {}]", bad("tags")))),
                format!("{ENTRY_PATH}.tags[1]"),
            ),
        ];
        for (consumer, path) in cases {
            let field = path.rsplit('.').next().unwrap().trim_end_matches("[1]");
            let text = consumers(&[consumer]);
            let out = check_fails(&text);
            out.assert_problem(line_of(&text, &bad(field)), &path, "control character");
            out.assert_problem_count(1);
        }
    }
}

#[test]
fn yaml_syntax_errors_name_line_and_column() {
    let valid = consumers(&[Consumer::valid("user1")]);
    // An unclosed flow sequence, then a line that cannot continue it.
    let broken = valid.replacen(
        "custom_id: \"user1-id\"",
        "custom_id: \"user1-id\"\n    tags: [a, b\n    other: x",
        1,
    );
    let out = check_fails(&broken);
    let line = line_of(&broken, "other: x");
    let errors = out.errors();
    assert_eq!(errors.len(), 1, "{}", out.show());
    let expected = format!("error: {}:{line}: YAML syntax error at column ", out.file);
    let rest = errors[0]
        .strip_prefix(&expected)
        .unwrap_or_else(|| panic!("expected `{expected}…`\n{}", out.show()));
    let column: u32 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no column number\n{}", out.show()));
    assert!(column >= 1, "{}", out.show());

    // A badly indented key.
    let broken = valid.replacen(
        "    custom_id: \"user1-id\"",
        "   custom_id: \"user1-id\"",
        1,
    );
    let out = check_fails(&broken);
    let line = line_of(&broken, "custom_id: \"user1-id\"");
    let expected = format!("error: {}:{line}: YAML syntax error at column 4", out.file);
    assert!(
        out.errors().iter().any(|l| l.starts_with(&expected)),
        "expected `{expected}`\n{}",
        out.show()
    );
    out.assert_problem_count(1);
}

#[test]
fn a_duplicate_mapping_key_is_a_syntax_error() {
    // `max_input_tokens` twice in one entry (the second one would silently win otherwise).
    let text = consumers(&[Consumer::valid("user1")]).replacen(
        "max_input_tokens: 50000",
        "max_input_tokens: 50000\n              max_input_tokens: 1",
        1,
    );
    let out = check_fails(&text);
    let line = line_of(&text, "max_input_tokens: 1");
    let errors = out.errors();
    assert_eq!(errors.len(), 1, "{}", out.show());
    assert!(
        errors[0].starts_with(&format!("error: {}:{line}: ", out.file)),
        "{}",
        out.show()
    );
    assert!(
        errors[0].contains("duplicate") && errors[0].contains("max_input_tokens"),
        "{}",
        out.show()
    );
}

#[test]
fn ids_and_provider_names_must_be_visible_ascii() {
    for (field, value) in [
        ("id", "\"kt midm\""),
        ("provider_name", "\"k t\""),
        ("id", "\"믿음\""),
        ("provider_name", "\"kt \""),
    ] {
        let text =
            consumers(&[Consumer::valid("user1").entry(Entry::valid("e").set(field, value))]);
        let out = check_fails(&text);
        out.assert_problem(
            line_of(&text, &format!("{field}: {value}")),
            &format!("{ENTRY_PATH}.{field}"),
            "must be visible ASCII without spaces",
        );
        out.assert_problem_count(1);
    }
}

#[test]
fn usernames_custom_ids_and_groups_must_be_printable_ascii() {
    for (field, value) in [
        ("username", "\"사용자\""),
        ("custom_id", "\"clïent-001\""),
        ("group", "\"grüppe\""),
    ] {
        let mut consumer = Consumer::valid("user1");
        let path = if field == "group" {
            consumer.groups = vec![value.to_owned()];
            "consumers[0].acls[0].group".to_owned()
        } else {
            consumer = consumer.set(field, value);
            format!("consumers[0].{field}")
        };
        let text = consumers(&[consumer]);
        let out = check_fails(&text);
        out.assert_problem(
            line_of(&text, &format!("{field}: {value}")),
            &path,
            "must be printable ASCII",
        );
        out.assert_problem_count(1);
    }
    // Spaces are printable: they pass in these three.
    let mut consumer = Consumer::valid("user1")
        .set("username", "\"user one\"")
        .set("custom_id", "\"client 001\"");
    consumer.groups = vec!["\"group one\"".to_owned()];
    check_passes(&consumers(&[consumer]));
}

#[test]
fn a_group_with_a_comma_is_reported() {
    let mut consumer = Consumer::valid("user1");
    consumer.groups = vec!["\"ok-group\"".to_owned(), "\"a,b\"".to_owned()];
    let text = consumers(&[consumer]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "group: \"a,b\""),
        "consumers[0].acls[1].group",
        "comma",
    );
    out.assert_problem_count(1);
}

#[test]
fn an_unknown_field_in_the_plugin_config_is_reported() {
    let mut consumer = Consumer::valid("user1");
    consumer.config_extra = vec!["metadata_lists: []".to_owned()];
    let text = consumers(&[consumer]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "metadata_lists: []"),
        "consumers[0].plugins[0].config.metadata_lists",
        "unknown field `metadata_lists`",
    );
    out.assert_problem_count(1);
}

#[test]
fn an_unknown_field_in_an_entry_is_reported() {
    // A misspelled field: reported as unknown (and the real one as missing).
    let text = consumers(&[Consumer::valid("user1").entry(
        Entry::valid("e")
            .without("max_output_tokens")
            .set("max_output_token", "20000"),
    )]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "max_output_token: 20000"),
        &format!("{ENTRY_PATH}.max_output_token"),
        "unknown field `max_output_token`",
    );
    out.assert_problem(
        line_of(&text, "- id: \"e\""),
        &format!("{ENTRY_PATH}.max_output_tokens"),
        "required field is missing",
    );
    out.assert_problem_count(2);

    // An extra field next to all the right ones.
    let text = consumers(&[
        Consumer::valid("user1").entry(Entry::valid("e").set("description", "\"chat model\""))
    ]);
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "description: \"chat model\""),
        &format!("{ENTRY_PATH}.description"),
        "unknown field `description`",
    );
    out.assert_problem_count(1);
}

#[test]
fn unknown_fields_outside_user_metadata_are_ignored() {
    let head = "\
_format_version: \"3.0\"
_transform: true
upstreams:
  - name: llm-upstream
    targets:
      - target: 10.0.0.1:8080
        weight: 100
services:
  - name: openai-api
    url: https://api.openai.com
    retries: 3
    plugins:
      - name: ai-proxy
        config: {route_type: llm/v1/chat, auth: {header_name: Authorization}}
    routes:
      - name: gpt4o
        paths: [\"/gpt4o/chat\"]
        strip_path: true
        protocols: [http, https]
        plugins:
          - name: key-auth
            config: {key_names: [apikey], hide_credentials: true}
          - name: acl
            config: {allow: [\"user1-group\"], hide_groups_header: true}
certificates: []
";
    let tail = "\
plugins:
  - name: prometheus
    config: {per_consumer: true}
  - name: user-metadata
    config:
      metadata_list:
";
    let mut consumer = Consumer::valid("user1")
        .set("tags", "[\"user1-access\"]")
        .set("created_at", "1700000000");
    consumer.other_plugins = vec![
        "      - name: request-transformer\n        config: {add: {headers: [x]}, anything: 1}\n"
            .to_owned(),
        "      - name: rate-limiting\n        config: {minute: 5}\n        enabled: true\n"
            .to_owned(),
    ];
    let mut tail = tail.to_owned();
    Entry::valid("global-entry").render(&mut tail, 8);
    let text = seed(head, &[consumer], &tail);
    let out = check_passes(&text);
    assert!(
        out.stdout
            .contains("1 consumers, 1 keys, 2 metadata entries (0 with limits), 1 seed routes"),
        "{}",
        out.show()
    );
}

#[test]
fn routes_nested_under_services_are_validated() {
    let head = "\
services:
  - name: llama2-api
    url: http://llama2.internal:8080
  - name: openai-api
    url: https://api.openai.com
    routes:
      - name: gpt4o
        paths: [\"/gpt4o/chat\"]
        plugins:
          - name: acl
            config:
              allow: [\"openai,allowed\"]
";
    let text = seed(head, &[Consumer::valid("user1")], "");
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "allow: [\"openai,allowed\"]"),
        "services[1].routes[0].plugins[0].config.allow[0]",
        "comma",
    );
    out.assert_problem_count(1);
}

#[test]
fn the_first_service_route_path_starts_at_services_0() {
    let head = "\
services:
  - name: openai-api
    url: https://api.openai.com
    routes:
      - name: gpt4o
        paths: [\"/gpt4o/chat\"]
        plugins:
          - name: acl
            config: {allow: [\"a,b\"]}
";
    let text = seed(head, &[Consumer::valid("user1")], "");
    let out = check_fails(&text);
    out.assert_problem(
        line_of(&text, "allow: [\"a,b\"]"),
        "services[0].routes[0].plugins[0].config.allow[0]",
        "must not contain a comma",
    );

    // The same route, valid, is read and counted.
    let out = check_passes(&text.replace("a,b", "user1-group"));
    assert!(out.stdout.contains("1 seed routes"), "{}", out.show());
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let mut third = Consumer::valid("user3");
    third.groups = vec!["\"x,y\"".to_owned()];
    let text = consumers(&[
        Consumer::valid("user1").entry(Entry::valid("e1").without_row("T5")),
        Consumer::valid("user2").entry(Entry::valid("e2").set("max_input_tokens", "-7")),
        third,
    ]);
    let out = check_fails(&text);
    assert!(out.errors().len() >= 3, "{}", out.show());
    out.assert_problem_at(
        &[
            lines_of(&text, "tdl_matrix:")[0],
            lines_of(&text, "T1: ")[0],
        ],
        "consumers[0].plugins[0].config.metadata_list[0].tdl_matrix",
        "missing T5",
    );
    out.assert_problem(
        line_of(&text, "max_input_tokens: -7"),
        "consumers[1].plugins[0].config.metadata_list[0].max_input_tokens",
        ">= 0",
    );
    out.assert_problem(
        line_of(&text, "group: \"x,y\""),
        "consumers[2].acls[0].group",
        "comma",
    );
    out.assert_problem_count(3);
}

#[test]
fn serve_with_a_bad_seed_exits_within_2s_with_the_check_messages() {
    let text = consumers(&[
        Consumer::valid("user1").entry(Entry::valid("e1").set("capabilities", "[2]")),
        Consumer::valid("user2").set("username", "\"user1\""),
    ]);
    let files = write_files(&text);
    let checked = {
        let out = command()
            .arg("check")
            .arg("--config")
            .arg(&files.config)
            .output()
            .unwrap();
        output_of(out, &files.seed)
    };
    assert_eq!(checked.code, Some(1), "{}", checked.show());
    assert_eq!(checked.errors().len(), 2, "{}", checked.show());

    let start = Instant::now();
    let mut child = command()
        .arg("serve")
        .arg("--config")
        .arg(&files.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(2) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve still running after 2 s\n{}",
                output_of(out, &files.seed).show()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let served = output_of(child.wait_with_output().unwrap(), &files.seed);
    assert!(!status.success(), "{}", served.show());
    assert_eq!(served.errors(), checked.errors(), "{}", served.show());
    served.assert_problem(
        line_of(&text, "capabilities: [2]"),
        "consumers[0].plugins[0].config.metadata_list[0].capabilities[0]",
        "must be 0 or 1",
    );
    served.assert_problem(
        lines_of(&text, "username: \"user1\"")[1],
        "consumers[1].username",
        "duplicate username",
    );
}

#[test]
fn check_with_a_missing_config_file_fails_naming_it() {
    let out = command()
        .args(["check", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: /nonexistent.toml") && l.contains("does not exist")),
        "{stderr}"
    );
}

#[test]
fn the_bundled_seed_passes() {
    let out = command()
        .args(["check", "--config", "config/default.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("ok: ") && stdout.contains("2 consumers"),
        "{stdout}{stderr}"
    );
    assert!(!stderr.contains("error:"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Seed file safety (SPEC §2): only a regular file of at most `seed.max_bytes` is read
// ---------------------------------------------------------------------------------------------

/// An embedded-mode config in `dir` whose `[seed] path` is `seed`.
fn config_for_seed(dir: &Path, seed: &Path) -> PathBuf {
    let config = dir.join("uma.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[redis]\nurl = \"\"\n[seed]\npath = {:?}\n",
            seed.display().to_string()
        ),
    )
    .unwrap();
    config
}

/// Runs the binary with `args` and `env`; fails the test if it is still running after 2 s.
fn run_within_2s(args: &[&std::ffi::OsStr], env: &[(&str, &str)], seed: &Path) -> Outcome {
    let start = Instant::now();
    let mut child = command()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(2) {
            child.kill().unwrap();
            let out = output_of(child.wait_with_output().unwrap(), seed);
            panic!("{args:?} still running after 2 s\n{}", out.show());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    output_of(child.wait_with_output().unwrap(), seed)
}

/// `check` and `serve` with `seed` as the configured seed both exit 1 within 2 s, printing the same
/// single problem: `error: SEED: <reason>`.
fn assert_seed_refused(seed: &Path, env: &[(&str, &str)], reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for_seed(dir.path(), seed);
    let mut outcomes = Vec::new();
    for sub in ["check", "serve"] {
        let args = [sub.as_ref(), "--config".as_ref(), config.as_os_str()];
        let out = run_within_2s(&args, env, seed);
        assert_eq!(out.code, Some(1), "{sub}\n{}", out.show());
        assert_eq!(
            out.errors(),
            [format!("error: {}: {reason}", seed.display())],
            "{sub}\n{}",
            out.show()
        );
        outcomes.push(out.errors().join("\n"));
    }
    assert_eq!(outcomes[0], outcomes[1], "check and serve say the same");
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_fifo_as_seed_is_refused_without_waiting_for_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("seed.yaml");
    mkfifo(&fifo);
    assert_seed_refused(&fifo, &[], "not a regular file (a FIFO)");
    // The same through `check --seed`, and through a symbolic link (as Kubernetes mounts files).
    let link = dir.path().join("link.yaml");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let valid = write_files(&consumers(&[Consumer::valid("user1")]));
    let args = [
        "check".as_ref(),
        "--config".as_ref(),
        valid.config.as_os_str(),
        "--seed".as_ref(),
        link.as_os_str(),
    ];
    let out = run_within_2s(&args, &[], &link);
    assert_eq!(out.code, Some(1), "{}", out.show());
    assert_eq!(
        out.errors(),
        [format!(
            "error: {}: not a regular file (a FIFO)",
            link.display()
        )]
    );
}

#[test]
fn a_device_as_seed_is_refused() {
    assert_seed_refused(
        Path::new("/dev/zero"),
        &[],
        "not a regular file (a character device)",
    );
}

#[test]
fn a_directory_as_seed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_seed_refused(dir.path(), &[], "not a regular file (a directory)");
}

#[test]
fn a_seed_larger_than_max_bytes_is_refused_and_one_at_the_limit_passes() {
    let files = write_files(&consumers(&[Consumer::valid("user1")]));
    let size = std::fs::metadata(&files.seed).unwrap().len();
    let limit = (size - 1).to_string();
    assert_seed_refused(
        &files.seed,
        &[("UMA_SEED__MAX_BYTES", &limit)],
        &format!("is {size} bytes, larger than seed.max_bytes ({limit})"),
    );
    let at_limit = size.to_string();
    let args = [
        "check".as_ref(),
        "--config".as_ref(),
        files.config.as_os_str(),
    ];
    let out = run_within_2s(&args, &[("UMA_SEED__MAX_BYTES", &at_limit)], &files.seed);
    assert_eq!(out.code, Some(0), "{}", out.show());
}

#[test]
fn a_symbolic_link_to_a_regular_seed_is_read() {
    let files = write_files(&consumers(&[Consumer::valid("user1")]));
    let link = files.seed.with_file_name("link.yaml");
    std::os::unix::fs::symlink(&files.seed, &link).unwrap();
    let args = [
        "check".as_ref(),
        "--config".as_ref(),
        files.config.as_os_str(),
        "--seed".as_ref(),
        link.as_os_str(),
    ];
    let out = run_within_2s(&args, &[], &link);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.stdout.starts_with("ok: 1 consumers"), "{}", out.show());
}
