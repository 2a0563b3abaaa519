//! The seed schema (SPEC §3), checked by hand over the position-aware YAML tree.
//!
//! Kong's declarative format is read loosely where Kong is loose (unknown top-level sections, other
//! plugins and fields are ignored) and strictly inside `user-metadata`, whose fields end up in
//! headers. Every problem is collected with its line and field path; nothing is returned unless the
//! whole document is valid.

use std::collections::HashMap;
use std::sync::Arc;

use super::yaml::{Node, Value};
use crate::core::format::Number;
use crate::core::model::SLOTS;
use crate::core::routes::{Acl, SeedRoute};
use crate::core::{Consumer, Entry, EntryFields, KeyHash, MetadataList};
use crate::problem::Problem;

/// Header values of one entry must leave room for the identity headers under nginx's 4 KiB buffer.
const MAX_ENTRY_HEADER_BYTES: usize = 3 * 1024;
const MAX_IDENTITY_HEADER_BYTES: usize = 512;

const ENTRY_FIELDS: [&str; 9] = [
    "id",
    "provider_name",
    "tags",
    "tdl_matrix",
    "capabilities",
    "max_input_tokens",
    "max_output_tokens",
    "input_cost_per_token",
    "output_cost_per_token",
];

/// A valid seed, ready to become a catalog.
#[derive(Debug, Default)]
pub struct SeedData {
    pub consumers: Vec<(Arc<Consumer>, Vec<KeyHash>)>,
    pub routes: Vec<(SeedRoute, Vec<String>)>,
    pub global: Option<Arc<MetadataList>>,
}

/// Which characters a string may hold.
#[derive(Clone, Copy)]
enum Text {
    /// `id`, `provider_name`: visible ASCII, no spaces.
    Visible,
    /// `username`, `custom_id`: printable ASCII (spaces allowed).
    Printable,
    /// ACL group names: printable ASCII without a comma (groups are joined with `, `).
    Group,
    /// Tags: any UTF-8 without control characters (they are JSON-escaped into a header).
    NoControl,
    /// API keys and names we do not put in headers: anything non-empty.
    Any,
}

impl Text {
    fn check(self, s: &str) -> Result<(), &'static str> {
        let ok = match self {
            Text::Visible => s.bytes().all(|b| b.is_ascii_graphic()),
            Text::Printable => s.bytes().all(|b| (0x20..0x7f).contains(&b)),
            Text::Group => {
                if s.contains(',') {
                    return Err("must not contain a comma");
                }
                s.bytes().all(|b| (0x20..0x7f).contains(&b))
            }
            Text::NoControl => !s.chars().any(char::is_control),
            Text::Any => true,
        };
        if ok {
            return Ok(());
        }
        if s.chars().any(char::is_control) {
            return Err("contains a control character (CR, LF, NUL, ...)");
        }
        Err(match self {
            Text::Visible => "must be visible ASCII without spaces",
            _ => "must be printable ASCII",
        })
    }
}

struct Ctx {
    file: String,
    problems: Vec<Problem>,
    /// Entries already built, by content: many consumers of a large seed carry the same entry, and
    /// one copy (with its prebuilt headers) serves them all.
    entries: HashMap<String, Arc<Entry>>,
}

impl Ctx {
    fn report(&mut self, line: u64, path: &str, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line: (line > 0).then_some(line),
            path: path.to_owned(),
            reason: reason.into(),
        });
    }

    fn map<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [(String, Node)]> {
        match &node.value {
            Value::Map(entries) => Some(entries),
            other => {
                self.report(
                    node.line,
                    path,
                    format!("expected a mapping, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// A list; `null` (an empty YAML key) reads as an empty list.
    fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            Value::Null => Some(&[]),
            other => {
                self.report(
                    node.line,
                    path,
                    format!("expected a list, found {}", other.kind()),
                );
                None
            }
        }
    }

    fn text(&mut self, node: &Node, path: &str, rule: Text) -> Option<String> {
        let Value::Str(s) = &node.value else {
            self.report(
                node.line,
                path,
                format!("expected a string, found {}", node.value.kind()),
            );
            return None;
        };
        if s.is_empty() {
            self.report(node.line, path, "must not be empty");
            return None;
        }
        match rule.check(s) {
            Ok(()) => Some(s.clone()),
            Err(reason) => {
                self.report(node.line, path, reason);
                None
            }
        }
    }

    fn number(&mut self, node: &Node, path: &str) -> Option<Number> {
        let number = match node.value {
            Value::Int(i) if i >= 0 => u64::try_from(i).ok().map(Number::Int),
            Value::Float(f) if f.is_finite() && f >= 0.0 => Some(Number::Float(f)),
            Value::Int(_) | Value::Float(_) => {
                self.report(node.line, path, "must be a number >= 0");
                return None;
            }
            _ => None,
        };
        if number.is_none() {
            self.report(
                node.line,
                path,
                format!("expected a number >= 0, found {}", node.value.kind()),
            );
        }
        number
    }

    fn integer(&mut self, node: &Node, path: &str) -> Option<u64> {
        match self.number(node, path)? {
            Number::Int(i) => Some(i),
            Number::Float(f) if f.fract() == 0.0 && f < 9_007_199_254_740_992.0 => Some(f as u64),
            Number::Float(_) => {
                self.report(node.line, path, "must be an integer");
                None
            }
        }
    }

    /// A required field of `map` (at `path`, written at `line`): reports it when missing or null.
    fn required<'n>(
        &mut self,
        map: &'n [(String, Node)],
        line: u64,
        path: &str,
        field: &str,
    ) -> Option<&'n Node> {
        match get(map, field) {
            Some(node) if node.value != Value::Null => Some(node),
            _ => {
                self.report(line, &join(path, field), "required field is missing");
                None
            }
        }
    }

    fn reject_unknown(&mut self, map: &[(String, Node)], path: &str, known: &[&str]) {
        for (key, node) in map {
            if !known.contains(&key.as_str()) {
                self.report(
                    node.line,
                    &join(path, key),
                    format!("unknown field `{key}`"),
                );
            }
        }
    }
}

fn get<'n>(map: &'n [(String, Node)], key: &str) -> Option<&'n Node> {
    map.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// A present, non-null optional field.
fn optional<'n>(map: &'n [(String, Node)], key: &str) -> Option<&'n Node> {
    get(map, key).filter(|n| n.value != Value::Null)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Checks the whole document; `file` labels every problem.
pub fn parse_document(root: &Node, file: &str) -> Result<SeedData, Vec<Problem>> {
    let mut ctx = Ctx {
        file: file.to_owned(),
        problems: Vec::new(),
        entries: HashMap::new(),
    };
    let mut seed = SeedData::default();
    if let Some(top) = ctx.map(root, "") {
        seed.consumers = consumers(&mut ctx, top);
        seed.routes = all_routes(&mut ctx, top);
        seed.global = global_list(&mut ctx, top);
    }
    if ctx.problems.is_empty() {
        Ok(seed)
    } else {
        Err(ctx.problems)
    }
}

/// One mapping of a list, with its field path and line.
struct Item<'n> {
    path: String,
    line: u64,
    map: &'n [(String, Node)],
}

impl Ctx {
    /// The mappings of list `field` of `owner` (absent or empty: none); other items are reported.
    fn maps_in<'n>(
        &mut self,
        owner: &'n [(String, Node)],
        path: &str,
        field: &str,
    ) -> Vec<Item<'n>> {
        let list_path = join(path, field);
        let Some(items) = get(owner, field).and_then(|node| self.seq(node, &list_path)) else {
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, node)| {
                let path = index(&list_path, i);
                let map = self.map(node, &path)?;
                Some(Item {
                    path,
                    line: node.line,
                    map,
                })
            })
            .collect()
    }
}

fn consumers(ctx: &mut Ctx, top: &[(String, Node)]) -> Vec<(Arc<Consumer>, Vec<KeyHash>)> {
    let mut usernames: HashMap<String, String> = HashMap::new();
    let mut keys: HashMap<KeyHash, String> = HashMap::new();
    let mut out = Vec::new();
    for Item { path, line, map } in ctx.maps_in(top, "", "consumers") {
        let username = ctx
            .required(map, line, &path, "username")
            .and_then(|n| ctx.text(n, &join(&path, "username"), Text::Printable));
        if let Some(name) = &username {
            if let Some(first) = usernames.get(name) {
                let line = get(map, "username").map_or(line, |n| n.line);
                ctx.report(
                    line,
                    &join(&path, "username"),
                    format!("duplicate username `{name}` (first at {first})"),
                );
            } else {
                usernames.insert(name.clone(), path.clone());
            }
        }
        let custom_id = optional(map, "custom_id")
            .and_then(|n| ctx.text(n, &join(&path, "custom_id"), Text::Printable));
        let hashes = credentials(ctx, map, &path, &mut keys);
        let groups = acl_groups(ctx, map, &path);
        let metadata = plugins(ctx, map, &path, Scope::Consumer).metadata;
        let Some(username) = username else { continue };
        match Consumer::new(username, custom_id, groups, metadata) {
            Ok(consumer) if consumer.identity_bytes() <= MAX_IDENTITY_HEADER_BYTES => {
                out.push((Arc::new(consumer), hashes));
            }
            Ok(_) => ctx.report(line, &path, format!("username, custom_id and groups exceed {MAX_IDENTITY_HEADER_BYTES} bytes of headers")),
            Err(e) => ctx.report(line, &path, format!("cannot be sent as header {}", e.header)),
        }
    }
    out
}

fn credentials(
    ctx: &mut Ctx,
    consumer: &[(String, Node)],
    path: &str,
    seen: &mut HashMap<KeyHash, String>,
) -> Vec<KeyHash> {
    let mut out = Vec::new();
    for Item { path, line, map } in ctx.maps_in(consumer, path, "keyauth_credentials") {
        let hash = match (optional(map, "key"), optional(map, "key_sha256")) {
            (Some(key), None) => ctx
                .text(key, &join(&path, "key"), Text::Any)
                .map(|k| KeyHash::of(&k)),
            (None, Some(hex)) => {
                let field = join(&path, "key_sha256");
                ctx.text(hex, &field, Text::Any).and_then(|h| {
                    let parsed = (h.len() == 64).then(|| KeyHash::from_hex(&h)).flatten();
                    if parsed.is_none() {
                        ctx.report(
                            hex.line,
                            &field,
                            "must be 64 hexadecimal characters (a SHA-256 digest)",
                        );
                    }
                    parsed
                })
            }
            (Some(_), Some(_)) => {
                ctx.report(line, &path, "give either `key` or `key_sha256`, not both");
                None
            }
            (None, None) => {
                ctx.report(
                    line,
                    &join(&path, "key"),
                    "required field is missing (or `key_sha256`)",
                );
                None
            }
        };
        let Some(hash) = hash else { continue };
        // The key itself is never printed: only where its first copy stands.
        if let Some(first) = seen.get(&hash) {
            ctx.report(
                line,
                &path,
                format!("duplicate API key (same key as {first})"),
            );
        } else {
            seen.insert(hash, path.clone());
            out.push(hash);
        }
    }
    out
}

fn acl_groups(ctx: &mut Ctx, consumer: &[(String, Node)], path: &str) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for Item { path, line, map } in ctx.maps_in(consumer, path, "acls") {
        let group = ctx
            .required(map, line, &path, "group")
            .and_then(|n| ctx.text(n, &join(&path, "group"), Text::Group));
        if let Some(group) = group.filter(|g| !groups.contains(g)) {
            groups.push(group);
        }
    }
    groups
}

/// Where a `plugins` list stands; decides which plugins are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Global,
    Consumer,
    Route,
}

/// What the plugins of one owner say to us.
#[derive(Default)]
struct Plugins {
    acl: Acl,
    metadata: Option<Arc<MetadataList>>,
}

/// Reads `owner`'s enabled `user-metadata` plugin (at most one) and, on routes, its `acl` plugins.
fn plugins(ctx: &mut Ctx, owner: &[(String, Node)], path: &str, scope: Scope) -> Plugins {
    let mut out = Plugins::default();
    let mut first_metadata: Option<String> = None;
    for Item { path, line, map } in ctx.maps_in(owner, path, "plugins") {
        if scope == Scope::Route && is_enabled_plugin(map, "acl") {
            route_acl(ctx, map, line, &path, &mut out.acl);
        }
        if !is_enabled_plugin(map, "user-metadata") {
            continue;
        }
        if scope == Scope::Global {
            for scoped in ["consumer", "route", "service"] {
                if let Some(n) = optional(map, scoped) {
                    ctx.report(n.line, &join(&path, scoped), format!("a {scoped}-scoped user-metadata plugin is not supported at the top level; put it under the {scoped}"));
                }
            }
        }
        if let Some(first) = &first_metadata {
            ctx.report(
                line,
                &path,
                format!("a second user-metadata plugin (first at {first})"),
            );
            continue;
        }
        out.metadata = metadata_config(ctx, map, line, &path);
        first_metadata = Some(path);
    }
    out
}

fn route_acl(ctx: &mut Ctx, plugin: &[(String, Node)], line: u64, path: &str, acl: &mut Acl) {
    let Some(config) = ctx.required(plugin, line, path, "config") else {
        return;
    };
    let path = join(path, "config");
    let Some(config) = ctx.map(config, &path) else {
        return;
    };
    acl.allow
        .extend(string_list(ctx, config, &path, "allow", Text::Group));
    acl.deny
        .extend(string_list(ctx, config, &path, "deny", Text::Group));
}

fn is_enabled_plugin(plugin: &[(String, Node)], name: &str) -> bool {
    let named = matches!(get(plugin, "name"), Some(Node { value: Value::Str(n), .. }) if n == name);
    let disabled = matches!(
        get(plugin, "enabled"),
        Some(Node {
            value: Value::Bool(false),
            ..
        })
    );
    named && !disabled
}

fn metadata_config(
    ctx: &mut Ctx,
    plugin: &[(String, Node)],
    line: u64,
    path: &str,
) -> Option<Arc<MetadataList>> {
    let config = ctx.required(plugin, line, path, "config")?;
    let config_path = join(path, "config");
    let map = ctx.map(config, &config_path)?;
    ctx.reject_unknown(map, &config_path, &["metadata_list"]);
    let list_node = ctx.required(map, config.line, &config_path, "metadata_list")?;
    metadata_list(ctx, list_node, &join(&config_path, "metadata_list"))
}

/// A `metadata_list`: at least one valid entry, ids unique.
fn metadata_list(ctx: &mut Ctx, list_node: &Node, list_path: &str) -> Option<Arc<MetadataList>> {
    let items = ctx.seq(list_node, list_path)?;
    if items.is_empty() {
        ctx.report(list_node.line, list_path, "must hold at least one entry");
        return None;
    }
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut entries = Vec::new();
    let mut complete = true;
    for (i, item) in items.iter().enumerate() {
        let path = index(list_path, i);
        match entry(ctx, item, &path) {
            Some(entry) => {
                if let Some(first) = ids.get(&entry.fields.id) {
                    let line = item.get("id").map_or(item.line, |n| n.line);
                    ctx.report(
                        line,
                        &join(&path, "id"),
                        format!(
                            "duplicate entry id `{}` (first at {first})",
                            entry.fields.id
                        ),
                    );
                } else {
                    ids.insert(entry.fields.id.clone(), path);
                }
                let shared = ctx
                    .entries
                    .entry(entry.json().to_owned())
                    .or_insert_with(|| Arc::new(entry));
                entries.push(shared.clone());
            }
            None => complete = false,
        }
    }
    complete.then(|| Arc::new(MetadataList::new(entries)))
}

fn entry(ctx: &mut Ctx, node: &Node, path: &str) -> Option<Entry> {
    let map = ctx.map(node, path)?;
    ctx.reject_unknown(map, path, &ENTRY_FIELDS);
    let line = node.line;
    let id = ctx
        .required(map, line, path, "id")
        .and_then(|n| ctx.text(n, &join(path, "id"), Text::Visible));
    let provider_name = ctx
        .required(map, line, path, "provider_name")
        .and_then(|n| ctx.text(n, &join(path, "provider_name"), Text::Visible));
    let tags = match optional(map, "tags") {
        Some(n) => tags(ctx, n, &join(path, "tags")),
        None => Some(Vec::new()),
    };
    let tdl_matrix = ctx
        .required(map, line, path, "tdl_matrix")
        .and_then(|n| tdl_matrix(ctx, n, &join(path, "tdl_matrix")));
    let capabilities = ctx
        .required(map, line, path, "capabilities")
        .and_then(|n| capabilities(ctx, n, &join(path, "capabilities")));
    let mut integer = |field: &str| {
        ctx.required(map, line, path, field)
            .and_then(|n| ctx.integer(n, &join(path, field)))
    };
    let max_input_tokens = integer("max_input_tokens");
    let max_output_tokens = integer("max_output_tokens");
    let mut number = |field: &str| {
        ctx.required(map, line, path, field)
            .and_then(|n| ctx.number(n, &join(path, field)))
    };
    let input_cost_per_token = number("input_cost_per_token");
    let output_cost_per_token = number("output_cost_per_token");
    let fields = EntryFields {
        id: id?,
        provider_name: provider_name?,
        tags: tags?,
        tdl_matrix: tdl_matrix?,
        capabilities: capabilities?,
        max_input_tokens: max_input_tokens?,
        max_output_tokens: max_output_tokens?,
        input_cost_per_token: input_cost_per_token?,
        output_cost_per_token: output_cost_per_token?,
    };
    match Entry::new(fields) {
        Ok(entry) if entry.header_bytes() <= MAX_ENTRY_HEADER_BYTES => Some(entry),
        Ok(entry) => {
            ctx.report(line, path, format!("headers would take {} bytes; at most {MAX_ENTRY_HEADER_BYTES} fit a gateway's header buffer", entry.header_bytes()));
            None
        }
        Err(e) => {
            ctx.report(line, path, format!("cannot be sent as header {}", e.header));
            None
        }
    }
}

fn tags(ctx: &mut Ctx, node: &Node, path: &str) -> Option<Vec<String>> {
    let items = ctx.seq(node, path)?;
    let tags: Vec<Option<String>> = items
        .iter()
        .enumerate()
        .map(|(i, n)| ctx.text(n, &index(path, i), Text::NoControl))
        .collect();
    tags.into_iter().collect()
}

fn tdl_matrix(ctx: &mut Ctx, node: &Node, path: &str) -> Option<[Vec<Number>; SLOTS]> {
    let map = ctx.map(node, path)?;
    let mut slots: [Option<Vec<Number>>; SLOTS] = Default::default();
    let mut complete = true;
    for (key, value) in map {
        let slot = key
            .strip_prefix('T')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=SLOTS).contains(n) && key == &format!("T{n}"));
        let Some(slot) = slot else {
            ctx.report(
                value.line,
                path,
                format!("unexpected key `{key}` (only T1..T12)"),
            );
            complete = false;
            continue;
        };
        let row_path = join(path, key);
        if value.value == Value::Null {
            // `T7:` with nothing after it is a forgotten row, not an empty one.
            ctx.report(
                value.line,
                &row_path,
                format!("missing T{slot} (no list of numbers given)"),
            );
            complete = false;
            continue;
        }
        let row = ctx.seq(value, &row_path).and_then(|items| {
            let values: Vec<Option<Number>> = items
                .iter()
                .enumerate()
                .map(|(i, n)| ctx.number(n, &index(&row_path, i)))
                .collect();
            values.into_iter().collect::<Option<Vec<Number>>>()
        });
        match row {
            Some(row) => slots[slot - 1] = Some(row),
            None => complete = false,
        }
    }
    for (i, slot) in slots.iter().enumerate() {
        if slot.is_none() && get(map, &format!("T{}", i + 1)).is_none() {
            ctx.report(node.line, path, format!("missing T{}", i + 1));
            complete = false;
        }
    }
    if !complete {
        return None;
    }
    Some(slots.map(Option::unwrap_or_default))
}

fn capabilities(ctx: &mut Ctx, node: &Node, path: &str) -> Option<Vec<u8>> {
    let items = ctx.seq(node, path)?;
    let flags: Vec<Option<u8>> = items
        .iter()
        .enumerate()
        .map(|(i, n)| match n.value {
            Value::Int(0) => Some(0),
            Value::Int(1) => Some(1),
            _ => {
                ctx.report(n.line, &index(path, i), "must be 0 or 1");
                None
            }
        })
        .collect();
    flags.into_iter().collect()
}

/// A consumer record as stored in Redis (see `seed::record`): `username`, optional `custom_id`,
/// `groups` and `metadata_list`, checked by the same rules as the seed.
pub fn consumer_record(root: &Node, label: &str) -> Result<Consumer, Vec<Problem>> {
    let mut ctx = Ctx {
        file: label.to_owned(),
        problems: Vec::new(),
        entries: HashMap::new(),
    };
    let consumer = ctx.map(root, "").and_then(|map| {
        ctx.reject_unknown(
            map,
            "",
            &["username", "custom_id", "groups", "metadata_list"],
        );
        let username = ctx
            .required(map, root.line, "", "username")
            .and_then(|n| ctx.text(n, "username", Text::Printable));
        let custom_id =
            optional(map, "custom_id").and_then(|n| ctx.text(n, "custom_id", Text::Printable));
        let groups = string_list(&mut ctx, map, "", "groups", Text::Group);
        let metadata = optional(map, "metadata_list")
            .and_then(|n| metadata_list(&mut ctx, n, "metadata_list"));
        Consumer::new(username?, custom_id, groups, metadata).ok()
    });
    match consumer {
        Some(consumer) if ctx.problems.is_empty() => Ok(consumer),
        _ if ctx.problems.is_empty() => Err(vec![Problem {
            file: label.to_owned(),
            line: None,
            path: String::new(),
            reason: "not a valid consumer record".into(),
        }]),
        _ => Err(ctx.problems),
    }
}

/// Top-level `routes` and `services[].routes[]`.
fn all_routes(ctx: &mut Ctx, top: &[(String, Node)]) -> Vec<(SeedRoute, Vec<String>)> {
    let mut out = routes(ctx, top, "");
    for service in ctx.maps_in(top, "", "services") {
        out.extend(routes(ctx, service.map, &service.path));
    }
    out
}

fn routes(ctx: &mut Ctx, owner: &[(String, Node)], path: &str) -> Vec<(SeedRoute, Vec<String>)> {
    let mut out = Vec::new();
    for Item { path, line, map } in ctx.maps_in(owner, path, "routes") {
        let name = match optional(map, "name") {
            Some(n) => ctx
                .text(n, &join(&path, "name"), Text::Any)
                .unwrap_or_default(),
            None => path.clone(),
        };
        let paths = string_list(ctx, map, &path, "paths", Text::Any);
        for (j, p) in paths.iter().enumerate() {
            if !p.starts_with('/') {
                let line = get(map, "paths").map_or(line, |n| n.line);
                ctx.report(
                    line,
                    &index(&join(&path, "paths"), j),
                    "must start with `/` (regex paths are not supported)",
                );
            }
        }
        let methods = string_list(ctx, map, &path, "methods", Text::Visible)
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        let Plugins { acl, metadata } = plugins(ctx, map, &path, Scope::Route);
        out.push((
            SeedRoute {
                name,
                methods,
                acl,
                metadata,
            },
            paths,
        ));
    }
    out
}

fn string_list(
    ctx: &mut Ctx,
    map: &[(String, Node)],
    path: &str,
    field: &str,
    rule: Text,
) -> Vec<String> {
    let Some(node) = optional(map, field) else {
        return Vec::new();
    };
    let list_path = join(path, field);
    let Some(items) = ctx.seq(node, &list_path) else {
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(i, n)| ctx.text(n, &index(&list_path, i), rule))
        .collect()
}

fn global_list(ctx: &mut Ctx, top: &[(String, Node)]) -> Option<Arc<MetadataList>> {
    plugins(ctx, top, "", Scope::Global).metadata
}
