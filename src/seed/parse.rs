//! The seed schema (SPEC §3, §5), checked by hand over the position-aware YAML tree.
//!
//! Kong's declarative format is read loosely where Kong is loose (unknown top-level sections, other
//! plugins and fields are ignored) and strictly where a mistake would change who gets in: inside
//! `user-metadata`, whose fields end up in headers, and wherever `acl` and `key-auth` stand. Those
//! are honoured in every placement Kong honours (route, service, top level scoped to a route or a
//! service, or global), with Kong's precedence (route, then service, then global; a disabled
//! instance does not count), and any placement this service does not support is a problem — an
//! access-control plugin is never dropped in silence. Every problem is collected with its line and
//! field path; nothing is returned unless the whole document is valid.

use std::collections::HashMap;
use std::sync::Arc;

use super::yaml::{Node, Value};
use crate::core::capability::{CapabilityNames, CapabilityRef};
use crate::core::decimal::Decimal;
use crate::core::limits::{Limits, SlotLimit};
use crate::core::model::SLOTS;
use crate::core::routes::{Acl, HostPattern, KeyAuth, RoutePath, SeedRoute};
use crate::core::text::Text;
use crate::core::{Consumer, Entry, EntryFields, KeyHash, MetadataList};
use crate::problem::Problem;

const ENTRY_FIELDS: [&str; 12] = [
    "id",
    "provider_name",
    "tags",
    "tdl_matrix",
    "capabilities",
    "max_input_tokens",
    "max_output_tokens",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "limits",
    "models",
];

const LIMIT_FIELDS: [&str; 6] = [
    "requests_per_minute",
    "requests_per_slot",
    "requests_per_day",
    "tokens_per_day",
    "cost_per_day",
    "cost_per_month",
];

/// Costs and prices are summed in integer units of 10^-12 (SPEC §9): a finer amount could not be
/// summed exactly, so it is refused (SPEC §8.1).
const MONEY_PLACES: u32 = 12;

/// The largest count, cost or price accepted: 15 digits before the point. A count or budget becomes
/// a RateLimit `q` or `r` (a structured-field integer has at most 15 digits), and SPEC §9 promises
/// exact sums only below 10^15 units of the price unit, so a larger budget could never be reached
/// exactly anyway. An accepted amount is below 10^27 units of 10^-12: `to_units(12)` always fits.
const MAX_AMOUNT: u64 = 999_999_999_999_999;

/// A route's paths as matched (with the length that ranks a regex).
pub type RoutePaths = Vec<(RoutePath, usize)>;

/// A valid seed, ready to become a catalog.
#[derive(Debug, Default)]
pub struct SeedData {
    pub consumers: Vec<(Arc<Consumer>, Vec<KeyHash>)>,
    pub routes: Vec<(SeedRoute, RoutePaths)>,
    pub global: Option<Arc<MetadataList>>,
    /// Unscoped top-level `acl` and `key-auth`, for URIs that match no route.
    pub global_acl: Option<Acl>,
    pub global_key_auth: Option<KeyAuth>,
    /// What the global `user-metadata` plugin requires (it applies to every route and to URIs
    /// that match none).
    pub global_require_capabilities: Vec<usize>,
}

type Map = [(String, Node)];

struct Ctx {
    file: String,
    problems: Vec<Problem>,
    /// Entries already built, by content: many consumers of a large seed carry the same entry, and
    /// one copy (with its prebuilt headers) serves them all.
    entries: HashMap<String, Arc<Entry>>,
    /// Every key digest seen, with where it was first given.
    keys: HashMap<KeyHash, String>,
    /// What `require_capabilities` may name (config `capabilities.names`).
    capability_names: CapabilityNames,
}

impl Ctx {
    fn new(file: &str) -> Ctx {
        Ctx {
            file: file.to_owned(),
            problems: Vec::new(),
            entries: HashMap::new(),
            keys: HashMap::new(),
            capability_names: CapabilityNames::default(),
        }
    }

    fn report(&mut self, line: u64, path: &str, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line: (line > 0).then_some(line),
            path: path.to_owned(),
            reason: reason.into(),
        });
    }

    fn map<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n Map> {
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

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.report(
                    node.line,
                    path,
                    format!("expected true or false, found {}", node.value.kind()),
                );
                None
            }
        }
    }

    /// A number >= 0, exactly as written.
    fn number(&mut self, node: &Node, path: &str) -> Option<Decimal> {
        let parsed = match &node.value {
            Value::Int(i) if *i < 0 => Err("must be a number >= 0"),
            Value::Int(i) => Decimal::parse(&i.to_string()).map_err(|_| "must be a number >= 0"),
            Value::Float(text) => Decimal::parse(text).map_err(|reason| match reason {
                "must be >= 0" | "must be a number" => "must be a number >= 0",
                other => other,
            }),
            other => {
                self.report(
                    node.line,
                    path,
                    format!("expected a number >= 0, found {}", other.kind()),
                );
                return None;
            }
        };
        parsed
            .map_err(|reason| self.report(node.line, path, reason))
            .ok()
    }

    fn integer(&mut self, node: &Node, path: &str) -> Option<u64> {
        let number = self.number(node, path)?;
        let integer = number.to_u64();
        if integer.is_none() {
            self.report(node.line, path, "must be an integer");
        }
        integer
    }

    /// A count of `limits` (requests or tokens): an integer >= 0 of at most 15 digits.
    fn count(&mut self, node: &Node, path: &str) -> Option<u64> {
        let count = self.integer(node, path)?;
        if count > MAX_AMOUNT {
            self.report(node.line, path, format!("must be at most {MAX_AMOUNT}"));
            return None;
        }
        Some(count)
    }

    /// A cost or price: a number >= 0 with at most 12 decimal places (counted on the value, so
    /// `0.50` has one) and at most 15 digits before the point.
    fn money(&mut self, node: &Node, path: &str) -> Option<Decimal> {
        let amount = self.number(node, path)?;
        if amount.decimal_places() > MONEY_PLACES {
            self.report(
                node.line,
                path,
                format!("must have at most {MONEY_PLACES} decimal places"),
            );
            return None;
        }
        let max_units = u128::from(MAX_AMOUNT) * 10u128.pow(MONEY_PLACES);
        // `to_units` is None only when the units overflow a u128: far past the maximum too.
        if amount
            .to_units(MONEY_PLACES)
            .is_none_or(|units| units > max_units)
        {
            self.report(node.line, path, format!("must be at most {MAX_AMOUNT}"));
            return None;
        }
        Some(amount)
    }

    /// A required field of `map` (at `path`, written at `line`): reports it when missing or null.
    fn required<'n>(
        &mut self,
        map: &'n Map,
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

    fn reject_unknown(&mut self, map: &Map, path: &str, known: &[&str]) {
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

    /// The mappings of list `field` of `owner` (absent or empty: none); other items are reported.
    fn maps_in<'n>(&mut self, owner: &'n Map, path: &str, field: &str) -> Vec<Item<'n>> {
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

    fn string_list(&mut self, map: &Map, path: &str, field: &str, rule: Text) -> Vec<String> {
        let Some(node) = optional(map, field) else {
            return Vec::new();
        };
        let list_path = join(path, field);
        let Some(items) = self.seq(node, &list_path) else {
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.text(n, &index(&list_path, i), rule))
            .collect()
    }
}

/// One mapping of a list, with its field path and line.
struct Item<'n> {
    path: String,
    line: u64,
    map: &'n Map,
}

fn get<'n>(map: &'n Map, key: &str) -> Option<&'n Node> {
    map.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// A present, non-null optional field.
fn optional<'n>(map: &'n Map, key: &str) -> Option<&'n Node> {
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
pub fn parse_document(
    root: &Node,
    file: &str,
    capability_names: &CapabilityNames,
) -> Result<SeedData, Vec<Problem>> {
    let mut ctx = Ctx::new(file);
    ctx.capability_names = capability_names.clone();
    let mut seed = SeedData::default();
    if let Some(top) = ctx.map(root, "") {
        seed.consumers = consumers(&mut ctx, top);
        let plugins = top_level_plugins(&mut ctx, top);
        let (routes, services) = all_routes(&mut ctx, top);
        check_references(&mut ctx, &plugins, &routes, &services);
        seed.routes = routes
            .into_iter()
            .map(|route| route.resolve(&services, &plugins))
            .collect();
        if let Some((global, _)) = plugins.global.metadata {
            seed.global = global.list;
            seed.global_require_capabilities = global.require;
        }
        seed.global_acl = plugins.global.acl.map(|(acl, _)| acl);
        seed.global_key_auth = plugins.global.key_auth.map(|(k, _)| k);
        check_shared_entry_ids(&mut ctx, &seed);
    }
    if ctx.problems.is_empty() {
        Ok(seed)
    } else {
        Err(ctx.problems)
    }
}

/// SPEC §9: an entry id in several route or global lists must be the same entry in all of them,
/// so a usage record for a consumer without a list of its own has one price, whichever list the
/// entry is found in.
fn check_shared_entry_ids(ctx: &mut Ctx, seed: &SeedData) {
    let lists = seed
        .routes
        .iter()
        .filter_map(|(r, _)| Some((format!("route `{}`", r.name), r.metadata.as_ref()?)))
        .chain(
            seed.global
                .iter()
                .map(|l| ("the global list".to_owned(), l)),
        );
    let mut first: HashMap<String, (String, Arc<Entry>)> = HashMap::new();
    let mut reported = std::collections::HashSet::new();
    for (place, list) in lists {
        for entry in list.entries() {
            match first.get(&*entry.id) {
                None => {
                    first.insert(entry.id.to_string(), (place.clone(), entry.clone()));
                }
                Some((where_first, earlier))
                    if earlier.json() != entry.json() && reported.insert(entry.id.clone()) =>
                {
                    let reason = format!(
                        "entry `{}` of {place} differs from the one in {where_first}: an id in \
                         several route or global lists must be identical in all of them (it \
                         decides the price of usage records)",
                        entry.id
                    );
                    ctx.report(0, "", reason);
                }
                Some(_) => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Consumers, their keys and groups
// ---------------------------------------------------------------------------------------------

/// A consumer while its keys and groups are gathered (top-level `acls` and `keyauth_credentials`
/// name consumers defined anywhere in the file).
struct Draft {
    path: String,
    line: u64,
    username: Option<String>,
    id: Option<String>,
    custom_id: Option<String>,
    groups: Vec<String>,
    keys: Vec<KeyHash>,
    metadata: Option<Arc<MetadataList>>,
    tags: Vec<String>,
}

fn consumers(ctx: &mut Ctx, top: &Map) -> Vec<(Arc<Consumer>, Vec<KeyHash>)> {
    let mut drafts: Vec<Draft> = Vec::new();
    let mut usernames: HashMap<String, String> = HashMap::new();
    for Item { path, line, map } in ctx.maps_in(top, "", "consumers") {
        let username = ctx
            .required(map, line, &path, "username")
            .and_then(|n| ctx.text(n, &join(&path, "username"), Text::Username));
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
        let draft = Draft {
            username,
            id: optional(map, "id").and_then(|n| ctx.text(n, &join(&path, "id"), Text::Name)),
            custom_id: optional(map, "custom_id")
                .and_then(|n| ctx.text(n, &join(&path, "custom_id"), Text::Printable)),
            keys: ctx
                .maps_in(map, &path, "keyauth_credentials")
                .into_iter()
                .filter_map(|item| credential(ctx, &item))
                .collect(),
            groups: ctx
                .maps_in(map, &path, "acls")
                .into_iter()
                .filter_map(|item| acl_group(ctx, &item))
                .collect(),
            metadata: consumer_plugins(ctx, map, &path),
            tags: seed_consumer_tags(map),
            path,
            line,
        };
        drafts.push(draft);
    }
    for item in ctx.maps_in(top, "", "keyauth_credentials") {
        if let Some(i) = owner(ctx, &drafts, &item) {
            drafts[i].keys.extend(credential(ctx, &item));
        }
    }
    for item in ctx.maps_in(top, "", "acls") {
        if let Some(i) = owner(ctx, &drafts, &item) {
            drafts[i].groups.extend(acl_group(ctx, &item));
        }
    }
    drafts
        .into_iter()
        .filter_map(|d| build_consumer(ctx, d))
        .collect()
}

fn build_consumer(ctx: &mut Ctx, draft: Draft) -> Option<(Arc<Consumer>, Vec<KeyHash>)> {
    let mut groups: Vec<String> = Vec::new();
    for group in draft.groups {
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    match Consumer::new(draft.username?, draft.custom_id, groups, draft.metadata) {
        Ok(mut consumer) => {
            consumer.tags = draft.tags;
            Some((Arc::new(consumer), draft.keys))
        }
        Err(e) => {
            ctx.report(draft.line, &draft.path, e.to_string());
            None
        }
    }
}

/// A seed consumer's Kong `tags`, kept for the admin API. Not validated: the seed's other consumer
/// fields are ignored (SPEC §3), so a tag that is not a plain string is skipped, not an error.
fn seed_consumer_tags(consumer: &Map) -> Vec<String> {
    let Some(Node {
        value: Value::Seq(items),
        ..
    }) = get(consumer, "tags")
    else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|n| match &n.value {
            Value::Str(s) if !s.chars().any(char::is_control) => Some(s.to_string()),
            _ => None,
        })
        .collect()
}

/// The consumer a top-level `acls` or `keyauth_credentials` item names (`consumer:` by username or
/// id, as a string or `{username: …}` / `{id: …}`).
fn owner(ctx: &mut Ctx, drafts: &[Draft], item: &Item) -> Option<usize> {
    let field = join(&item.path, "consumer");
    let node = ctx.required(item.map, item.line, &item.path, "consumer")?;
    let name = reference(ctx, node, &field, &["username", "id"])?;
    let found = drafts
        .iter()
        .position(|d| d.username.as_deref() == Some(&name) || d.id.as_deref() == Some(&name));
    if found.is_none() {
        ctx.report(
            node.line,
            &field,
            format!("no consumer `{name}` in this file"),
        );
    }
    found
}

/// A reference to another entity: a string, or a mapping with one of `keys`.
fn reference(ctx: &mut Ctx, node: &Node, path: &str, keys: &[&str]) -> Option<String> {
    match &node.value {
        Value::Str(_) => ctx.text(node, path, Text::Name),
        Value::Map(map) => match keys.iter().find_map(|k| optional(map, k).map(|n| (k, n))) {
            Some((key, n)) => ctx.text(n, &join(path, key), Text::Name),
            None => {
                ctx.report(
                    node.line,
                    path,
                    format!("must name the entity by {}", keys.join(" or ")),
                );
                None
            }
        },
        other => {
            ctx.report(
                node.line,
                path,
                format!("expected a name, found {}", other.kind()),
            );
            None
        }
    }
}

fn credential(ctx: &mut Ctx, item: &Item) -> Option<KeyHash> {
    let Item { path, line, map } = item;
    if let Some(ttl) = optional(map, "ttl") {
        ctx.report(
            ttl.line,
            &join(path, "ttl"),
            "a credential ttl is not supported (key expiry belongs to the admin API)",
        );
    }
    let hash = match (optional(map, "key"), optional(map, "key_sha256")) {
        (Some(key), None) => ctx
            .text(key, &join(path, "key"), Text::Key)
            .map(|k| KeyHash::of(&k)),
        (None, Some(hex)) => {
            let field = join(path, "key_sha256");
            ctx.text(hex, &field, Text::Key).and_then(|h| {
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
            ctx.report(*line, path, "give either `key` or `key_sha256`, not both");
            None
        }
        (None, None) => {
            ctx.report(
                *line,
                &join(path, "key"),
                "required field is missing (or `key_sha256`)",
            );
            None
        }
    }?;
    // The key itself is never printed: only where its first copy stands.
    if let Some(first) = ctx.keys.get(&hash) {
        let first = first.clone();
        ctx.report(
            *line,
            path,
            format!("duplicate API key (same key as {first})"),
        );
        return None;
    }
    ctx.keys.insert(hash, path.clone());
    Some(hash)
}

fn acl_group(ctx: &mut Ctx, item: &Item) -> Option<String> {
    ctx.required(item.map, item.line, &item.path, "group")
        .and_then(|n| ctx.text(n, &join(&item.path, "group"), Text::Group))
}

/// A consumer's own plugins: its `user-metadata` list. `acl` and `key-auth` cannot be scoped to a
/// consumer (Kong refuses them there too), so they are problems rather than ignored lines.
fn consumer_plugins(ctx: &mut Ctx, consumer: &Map, path: &str) -> Option<Arc<MetadataList>> {
    let mut set = PluginSet::default();
    for item in ctx.maps_in(consumer, path, "plugins") {
        reject_scope_fields(ctx, &item);
        match read_plugin(ctx, &item) {
            Some(Plugin::Metadata(plugin)) => {
                if !plugin.require.is_empty() {
                    ctx.report(item.line, &join(&item.path, "config.require_capabilities"), "belongs on a route, a service or the global plugin, which say what their upstream needs");
                }
                set.add_metadata(ctx, plugin, &item);
            }
            Some(Plugin::Acl(_) | Plugin::KeyAuth(_)) => ctx.report(
                item.line,
                &item.path,
                "acl and key-auth cannot be applied to a consumer; put them on a route, a service or the top level",
            ),
            None => {}
        }
    }
    set.metadata.and_then(|(plugin, _)| plugin.list)
}

// ---------------------------------------------------------------------------------------------
// Plugins and their placement
// ---------------------------------------------------------------------------------------------

/// One of the plugins this service honours.
enum Plugin {
    Acl(Acl),
    KeyAuth(KeyAuth),
    Metadata(MetadataPlugin),
}

/// A `user-metadata` plugin's config: its list (absent, or `None` when it had problems, already
/// reported) and the capabilities it requires of the chosen entry.
struct MetadataPlugin {
    list: Option<Arc<MetadataList>>,
    require: Vec<usize>,
}

/// The enabled instances of the honoured plugins on one entity, with where each was written.
#[derive(Default)]
struct PluginSet {
    acl: Option<(Acl, String)>,
    key_auth: Option<(KeyAuth, String)>,
    metadata: Option<(MetadataPlugin, String)>,
}

impl PluginSet {
    fn add(&mut self, ctx: &mut Ctx, plugin: Plugin, item: &Item) {
        match plugin {
            Plugin::Acl(acl) => put(ctx, &mut self.acl, acl, item, "acl"),
            Plugin::KeyAuth(key_auth) => put(ctx, &mut self.key_auth, key_auth, item, "key-auth"),
            Plugin::Metadata(plugin) => self.add_metadata(ctx, plugin, item),
        }
    }

    fn add_metadata(&mut self, ctx: &mut Ctx, plugin: MetadataPlugin, item: &Item) {
        put(ctx, &mut self.metadata, plugin, item, "user-metadata");
    }
}

/// Kong allows one instance of a plugin per entity: a second one is a problem, not a merge.
fn put<T>(ctx: &mut Ctx, slot: &mut Option<(T, String)>, value: T, item: &Item, name: &str) {
    match slot {
        Some((_, first)) => {
            let first = first.clone();
            ctx.report(
                item.line,
                &item.path,
                format!("a second {name} plugin on the same entity (first at {first})"),
            );
        }
        None => *slot = Some((value, item.path.clone())),
    }
}

/// Reads an enabled `acl`, `key-auth` or `user-metadata` plugin; other plugins and disabled
/// instances are `None` (Kong skips a disabled one before choosing by precedence).
fn read_plugin(ctx: &mut Ctx, item: &Item) -> Option<Plugin> {
    let name = match get(item.map, "name") {
        Some(Node {
            value: Value::Str(name),
            ..
        }) => name.as_str(),
        _ => return None,
    };
    if !matches!(name, "acl" | "key-auth" | "user-metadata") {
        return None;
    }
    if let Some(enabled) = get(item.map, "enabled")
        && !ctx.boolean(enabled, &join(&item.path, "enabled"))?
    {
        return None;
    }
    match name {
        "acl" => acl_config(ctx, item).map(Plugin::Acl),
        "key-auth" => Some(Plugin::KeyAuth(key_auth_config(ctx, item))),
        _ => metadata_config(ctx, item).map(Plugin::Metadata),
    }
}

/// Plugins nested under an entity take their scope from it; a scope field there is not supported.
fn reject_scope_fields(ctx: &mut Ctx, item: &Item) {
    if !is_honoured(item.map) {
        return;
    }
    for scope in ["consumer", "route", "service"] {
        if let Some(n) = optional(item.map, scope) {
            ctx.report(n.line, &join(&item.path, scope), format!("a `{scope}` scope on a nested plugin is not supported; nest the plugin under the {scope} instead"));
        }
    }
}

fn is_honoured(plugin: &Map) -> bool {
    matches!(get(plugin, "name"), Some(Node { value: Value::Str(n), .. }) if matches!(n.as_str(), "acl" | "key-auth" | "user-metadata"))
}

fn acl_config(ctx: &mut Ctx, item: &Item) -> Option<Acl> {
    let config = ctx.required(item.map, item.line, &item.path, "config")?;
    let path = join(&item.path, "config");
    let map = ctx.map(config, &path)?;
    for legacy in ["whitelist", "blacklist"] {
        if let Some(n) = optional(map, legacy) {
            ctx.report(n.line, &join(&path, legacy), format!("`{legacy}` was renamed in Kong 2.1 (use `allow` / `deny`); it is not read, so the route would be open"));
        }
    }
    let acl = Acl {
        allow: ctx.string_list(map, &path, "allow", Text::Group),
        deny: ctx.string_list(map, &path, "deny", Text::Group),
    };
    if optional(map, "allow").is_none() && optional(map, "deny").is_none() {
        ctx.report(config.line, &path, "needs `allow` or `deny`");
        return None;
    }
    Some(acl)
}

fn key_auth_config(ctx: &mut Ctx, item: &Item) -> KeyAuth {
    let mut key_auth = KeyAuth::default();
    let path = join(&item.path, "config");
    let Some(map) = optional(item.map, "config").and_then(|c| ctx.map(c, &path)) else {
        return key_auth;
    };
    if optional(map, "key_names").is_some() {
        let names = ctx.string_list(map, &path, "key_names", Text::Visible);
        for (i, name) in names.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                ctx.report(
                    item.line,
                    &index(&join(&path, "key_names"), i),
                    "must be a valid header name",
                );
            }
        }
        key_auth.key_names = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        if key_auth.key_names.is_empty() {
            ctx.report(
                item.line,
                &join(&path, "key_names"),
                "must name at least one key",
            );
        }
    }
    for (field, slot) in [
        ("key_in_header", &mut key_auth.in_header),
        ("key_in_query", &mut key_auth.in_query),
    ] {
        if let Some(value) = optional(map, field).and_then(|n| ctx.boolean(n, &join(&path, field)))
        {
            *slot = value;
        }
    }
    key_auth
}

/// The top-level `plugins`: unscoped (global), or scoped to a route or a service by name or id.
#[derive(Default)]
struct TopLevelPlugins {
    global: PluginSet,
    /// Reference (name or id) → plugins, with where the reference was written.
    by_route: Vec<(String, String, u64, PluginSet)>,
    by_service: Vec<(String, String, u64, PluginSet)>,
}

impl TopLevelPlugins {
    fn for_route(&self, route: &RouteDraft) -> Option<&PluginSet> {
        self.by_route
            .iter()
            .find(|(r, ..)| route.is_named(r))
            .map(|(.., set)| set)
    }

    fn for_service(&self, service: &ServiceInfo) -> Option<&PluginSet> {
        self.by_service
            .iter()
            .find(|(s, ..)| service.is_named(s))
            .map(|(.., set)| set)
    }
}

fn top_level_plugins(ctx: &mut Ctx, top: &Map) -> TopLevelPlugins {
    let mut out = TopLevelPlugins::default();
    for item in ctx.maps_in(top, "", "plugins") {
        if !is_honoured(item.map) {
            continue;
        }
        if let Some(n) = optional(item.map, "consumer") {
            ctx.report(
                n.line,
                &join(&item.path, "consumer"),
                "a consumer-scoped plugin is not supported; put user-metadata under the consumer",
            );
            continue;
        }
        let route = optional(item.map, "route").map(|n| (n, "route"));
        let service = optional(item.map, "service").map(|n| (n, "service"));
        let scope = match (route, service) {
            (Some(_), Some(_)) => {
                ctx.report(
                    item.line,
                    &item.path,
                    "a plugin scoped to both a route and a service is not supported",
                );
                continue;
            }
            (scope, None) | (None, scope) => scope,
        };
        let Some(plugin) = read_plugin(ctx, &item) else {
            continue;
        };
        let Some((node, kind)) = scope else {
            out.global.add(ctx, plugin, &item);
            continue;
        };
        let field = join(&item.path, kind);
        let Some(name) = reference(ctx, node, &field, &["name", "id"]) else {
            continue;
        };
        let list = if kind == "route" {
            &mut out.by_route
        } else {
            &mut out.by_service
        };
        let at = match list.iter().position(|(n, ..)| *n == name) {
            Some(at) => at,
            None => {
                list.push((name, field, node.line, PluginSet::default()));
                list.len() - 1
            }
        };
        list[at].3.add(ctx, plugin, &item);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Services and routes
// ---------------------------------------------------------------------------------------------

struct ServiceInfo {
    name: Option<String>,
    id: Option<String>,
    plugins: PluginSet,
}

impl ServiceInfo {
    fn is_named(&self, reference: &str) -> bool {
        self.name.as_deref() == Some(reference) || self.id.as_deref() == Some(reference)
    }
}

struct RouteDraft {
    route: SeedRoute,
    id: Option<String>,
    paths: RoutePaths,
    service: Option<usize>,
    plugins: PluginSet,
}

impl RouteDraft {
    fn is_named(&self, reference: &str) -> bool {
        self.route.name == reference || self.id.as_deref() == Some(reference)
    }

    /// Applies Kong's precedence: each plugin from the route, else its service, else global.
    fn resolve(self, services: &[ServiceInfo], top: &TopLevelPlugins) -> (SeedRoute, RoutePaths) {
        let service = self.service.and_then(|i| services.get(i));
        let specific: Vec<&PluginSet> = [
            Some(&self.plugins),
            top.for_route(&self),
            service.map(|s| &s.plugins),
            service.and_then(|s| top.for_service(s)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let with_global = || specific.iter().copied().chain([&top.global]);
        let acl = with_global()
            .find_map(|set| set.acl.as_ref())
            .map(|(acl, _)| acl.clone());
        let key_auth = with_global()
            .find_map(|set| set.key_auth.as_ref())
            .map(|(k, _)| k.clone());
        // The global list stays the catalog's own fallback; a route carries its own or its
        // service's: the most specific instance that has a list (one that only requires
        // capabilities does not hide its service's list).
        let metadata = specific
            .iter()
            .filter_map(|set| set.metadata.as_ref())
            .find_map(|(plugin, _)| plugin.list.clone());
        // Requirements add up over every instance that applies, the global one included.
        let mut require_capabilities: Vec<usize> = Vec::new();
        for (plugin, _) in with_global().filter_map(|set| set.metadata.as_ref()) {
            for index in &plugin.require {
                if !require_capabilities.contains(index) {
                    require_capabilities.push(*index);
                }
            }
        }
        let route = SeedRoute {
            acl,
            key_auth,
            metadata,
            require_capabilities,
            ..self.route
        };
        (route, self.paths)
    }
}

/// Top-level `routes` (naming their service with `service:`) and `services[].routes[]`.
fn all_routes(ctx: &mut Ctx, top: &Map) -> (Vec<RouteDraft>, Vec<ServiceInfo>) {
    let mut services = Vec::new();
    let mut routes = Vec::new();
    for (i, item) in ctx.maps_in(top, "", "services").into_iter().enumerate() {
        services.push(ServiceInfo {
            name: optional(item.map, "name")
                .and_then(|n| ctx.text(n, &join(&item.path, "name"), Text::Name)),
            id: optional(item.map, "id")
                .and_then(|n| ctx.text(n, &join(&item.path, "id"), Text::Name)),
            plugins: nested_plugins(ctx, item.map, &item.path),
        });
        for route in ctx.maps_in(item.map, &item.path, "routes") {
            routes.extend(route_draft(ctx, &route, Some(i)));
        }
    }
    for route in ctx.maps_in(top, "", "routes") {
        let service = optional(route.map, "service").and_then(|node| {
            let field = join(&route.path, "service");
            let name = reference(ctx, node, &field, &["name", "id"])?;
            let found = services.iter().position(|s| s.is_named(&name));
            if found.is_none() {
                ctx.report(
                    node.line,
                    &field,
                    format!("no service `{name}` in this file"),
                );
            }
            found
        });
        routes.extend(route_draft(ctx, &route, service));
    }
    (routes, services)
}

/// The honoured plugins nested under a service or route.
fn nested_plugins(ctx: &mut Ctx, owner: &Map, path: &str) -> PluginSet {
    let mut set = PluginSet::default();
    for item in ctx.maps_in(owner, path, "plugins") {
        reject_scope_fields(ctx, &item);
        if let Some(plugin) = read_plugin(ctx, &item) {
            set.add(ctx, plugin, &item);
        }
    }
    set
}

fn route_draft(ctx: &mut Ctx, item: &Item, service: Option<usize>) -> Option<RouteDraft> {
    let Item { path, line, map } = item;
    let name = match optional(map, "name") {
        Some(n) => ctx
            .text(n, &join(path, "name"), Text::Name)
            .unwrap_or_default(),
        None => path.clone(),
    };
    let id = optional(map, "id").and_then(|n| ctx.text(n, &join(path, "id"), Text::Name));
    let paths = route_paths(ctx, map, path, *line);
    let methods = ctx
        .string_list(map, path, "methods", Text::Visible)
        .into_iter()
        .map(|m| m.to_ascii_uppercase())
        .collect();
    let hosts = route_hosts(ctx, map, path, *line);
    let plugins = nested_plugins(ctx, map, path);
    Some(RouteDraft {
        route: SeedRoute {
            name,
            methods,
            hosts,
            ..SeedRoute::default()
        },
        id,
        paths,
        service,
        plugins,
    })
}

/// A route without `paths` matches every path (Kong routes it by its hosts or methods alone).
fn route_paths(ctx: &mut Ctx, map: &Map, path: &str, line: u64) -> RoutePaths {
    if optional(map, "paths").is_none() {
        return vec![(RoutePath::Prefix("/".to_owned()), 1)];
    }
    let field = join(path, "paths");
    let line = get(map, "paths").map_or(line, |n| n.line);
    let written = ctx.string_list(map, path, "paths", Text::Name);
    let mut out = Vec::new();
    for (j, p) in written.iter().enumerate() {
        if !p.starts_with('/') && !p.starts_with('~') {
            ctx.report(
                line,
                &index(&field, j),
                "must start with `/` (or `~` for a regex path)",
            );
            continue;
        }
        match RoutePath::parse(p) {
            Ok(route_path) => out.push((route_path, p.trim_start_matches('~').len())),
            Err(reason) => ctx.report(line, &index(&field, j), reason),
        }
    }
    out
}

fn route_hosts(ctx: &mut Ctx, map: &Map, path: &str, line: u64) -> Vec<HostPattern> {
    let field = join(path, "hosts");
    let line = get(map, "hosts").map_or(line, |n| n.line);
    let written = ctx.string_list(map, path, "hosts", Text::Visible);
    let mut out = Vec::new();
    for (j, host) in written.iter().enumerate() {
        let wildcard_inside = host.trim_start_matches("*.").contains('*');
        if wildcard_inside || (host.starts_with('*') && !host.starts_with("*.")) {
            ctx.report(
                line,
                &index(&field, j),
                "only a leading `*.` wildcard is supported",
            );
            continue;
        }
        out.push(HostPattern::parse(host));
    }
    out
}

/// Every top-level plugin scoped to a route or a service must name one that exists.
fn check_references(
    ctx: &mut Ctx,
    plugins: &TopLevelPlugins,
    routes: &[RouteDraft],
    services: &[ServiceInfo],
) {
    for (name, field, line, _) in &plugins.by_route {
        if !routes.iter().any(|r| r.is_named(name)) {
            ctx.report(*line, field, format!("no route `{name}` in this file"));
        }
    }
    for (name, field, line, _) in &plugins.by_service {
        if !services.iter().any(|s| s.is_named(name)) {
            ctx.report(*line, field, format!("no service `{name}` in this file"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// user-metadata: lists and entries
// ---------------------------------------------------------------------------------------------

/// A `user-metadata` config: `metadata_list`, and `require_capabilities` (names or indexes of
/// `capabilities.names`); a config that requires capabilities may carry no list.
fn metadata_config(ctx: &mut Ctx, item: &Item) -> Option<MetadataPlugin> {
    let config = ctx.required(item.map, item.line, &item.path, "config")?;
    let config_path = join(&item.path, "config");
    let map = ctx.map(config, &config_path)?;
    ctx.reject_unknown(
        map,
        &config_path,
        &["metadata_list", "require_capabilities"],
    );
    let require = require_capabilities(ctx, map, &config_path);
    let list = match optional(map, "metadata_list") {
        Some(node) => metadata_list(ctx, node, &join(&config_path, "metadata_list")),
        None if optional(map, "require_capabilities").is_some() => None,
        None => {
            ctx.required(map, config.line, &config_path, "metadata_list");
            return None;
        }
    };
    Some(MetadataPlugin { list, require })
}

fn require_capabilities(ctx: &mut Ctx, config: &Map, config_path: &str) -> Vec<usize> {
    let path = join(config_path, "require_capabilities");
    let Some(items) = optional(config, "require_capabilities").and_then(|n| ctx.seq(n, &path))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, node) in items.iter().enumerate() {
        let item_path = index(&path, i);
        let reference = match &node.value {
            Value::Int(n) if *n >= 0 => u64::try_from(*n).ok().map(CapabilityRef::Index),
            Value::Str(name) => Some(CapabilityRef::Name(name.clone())),
            _ => None,
        };
        let Some(reference) = reference else {
            ctx.report(
                node.line,
                &item_path,
                "expected a capability name or an index >= 0",
            );
            continue;
        };
        match ctx.capability_names.resolve(&reference) {
            Ok(index) if !out.contains(&index) => out.push(index),
            Ok(_) => {}
            Err(reason) => ctx.report(node.line, &item_path, reason),
        }
    }
    out
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
    let mut text = |field: &str, rule: Text| {
        ctx.required(map, line, path, field)
            .and_then(|n| ctx.text(n, &join(path, field), rule))
    };
    let id = text("id", Text::Visible);
    let provider_name = text("provider_name", Text::Visible);
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
    let mut money = |field: &str| {
        ctx.required(map, line, path, field)
            .and_then(|n| ctx.money(n, &join(path, field)))
    };
    let input_cost_per_token = money("input_cost_per_token");
    let output_cost_per_token = money("output_cost_per_token");
    let cache_read_input_token_cost = match optional(map, "cache_read_input_token_cost") {
        Some(n) => ctx
            .money(n, &join(path, "cache_read_input_token_cost"))
            .map(Some),
        None => Some(None),
    };
    let limits = match get(map, "limits") {
        Some(n) => limits(ctx, n, &join(path, "limits")),
        None => Some(None),
    };
    let models = match optional(map, "models") {
        Some(n) => models(ctx, n, &join(path, "models")).map(Some),
        None => Some(None),
    };
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
        cache_read_input_token_cost: cache_read_input_token_cost?,
        limits: limits?,
        models: models?,
    };
    Entry::new(fields)
        .map_err(|e| ctx.report(line, path, e.to_string()))
        .ok()
}

/// An entry's `limits` (SPEC §8.1): `Some(None)` for no limits, `None` once a problem is reported.
///
/// `limits: null` and `limits: {}` (or a block of nothing but `requests_per_slot: {}`) mean no
/// limits, exactly as if the block were absent: such an entry is then the same entry (one JSON form,
/// no RateLimit fields). A field written without a value is refused rather than read as "no limit",
/// so a forgotten number never lifts a quota in silence; leave the field out instead.
fn limits(ctx: &mut Ctx, node: &Node, path: &str) -> Option<Option<Limits>> {
    if node.value == Value::Null {
        return Some(None);
    }
    let map = ctx.map(node, path)?;
    // Every field is read even after a bad one, so that all problems are reported at once.
    let before = ctx.problems.len();
    ctx.reject_unknown(map, path, &LIMIT_FIELDS);
    let mut count = |field: &str| get(map, field).and_then(|n| ctx.count(n, &join(path, field)));
    let requests_per_minute = count("requests_per_minute");
    let requests_per_day = count("requests_per_day");
    let tokens_per_day = count("tokens_per_day");
    let requests_per_slot = get(map, "requests_per_slot")
        .and_then(|n| slot_limit(ctx, n, &join(path, "requests_per_slot")));
    let mut money = |field: &str| get(map, field).and_then(|n| ctx.money(n, &join(path, field)));
    let cost_per_day = money("cost_per_day");
    let cost_per_month = money("cost_per_month");
    if ctx.problems.len() > before {
        return None;
    }
    let limits = Limits {
        requests_per_minute,
        requests_per_slot,
        requests_per_day,
        tokens_per_day,
        cost_per_day,
        cost_per_month,
    };
    Some((limits != Limits::default()).then_some(limits))
}

/// `requests_per_slot`: one count for every slot, or a mapping of some of T1..T12 to counts (an
/// empty mapping limits no slot, so it reads as no slot limit). Problems are reported; the caller
/// tells them apart from "no slot limit" by the problem count.
fn slot_limit(ctx: &mut Ctx, node: &Node, path: &str) -> Option<SlotLimit> {
    match &node.value {
        Value::Map(map) => {
            let mut slots = [None; SLOTS];
            for (key, value) in map {
                let key_path = join(path, key);
                match slot_number(key) {
                    Some(slot) => slots[slot - 1] = ctx.count(value, &key_path),
                    None => ctx.report(
                        value.line,
                        &key_path,
                        format!("unexpected key `{key}` (only T1..T12)"),
                    ),
                }
            }
            slots
                .iter()
                .any(Option::is_some)
                .then_some(SlotLimit::Some(slots))
        }
        Value::Int(_) | Value::Float(_) => ctx.count(node, path).map(SlotLimit::Every),
        other => {
            ctx.report(
                node.line,
                path,
                format!(
                    "expected an integer >= 0 or a mapping of T1..T12 to integers, found {}",
                    other.kind()
                ),
            );
            None
        }
    }
}

/// The slot a key `T1`..`T12` names (1-based); `T01`, `T0`, `T13` and others name none.
fn slot_number(key: &str) -> Option<usize> {
    key.strip_prefix('T')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=SLOTS).contains(n) && key == format!("T{n}"))
}

/// An entry's `models` (SPEC §8.3): at least one name, each visible ASCII with `*` only as its
/// last character (a trailing wildcard). An empty list is refused rather than read as "no model":
/// leave the field out to admit any model.
fn models(ctx: &mut Ctx, node: &Node, path: &str) -> Option<Vec<String>> {
    let items = ctx.seq(node, path)?;
    if items.is_empty() {
        ctx.report(
            node.line,
            path,
            "must name at least one model (leave the field out to allow any model)",
        );
        return None;
    }
    let models: Vec<Option<String>> = items
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let item_path = index(path, i);
            let name = ctx.text(n, &item_path, Text::Visible)?;
            if name.find('*').is_some_and(|at| at + 1 != name.len()) {
                ctx.report(
                    n.line,
                    &item_path,
                    "`*` may only be the last character (a trailing wildcard)",
                );
                return None;
            }
            Some(name)
        })
        .collect();
    models.into_iter().collect()
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

fn tdl_matrix(ctx: &mut Ctx, node: &Node, path: &str) -> Option<[Vec<Decimal>; SLOTS]> {
    let map = ctx.map(node, path)?;
    let mut slots: [Option<Vec<Decimal>>; SLOTS] = Default::default();
    let mut complete = true;
    for (key, value) in map {
        let Some(slot) = slot_number(key) else {
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
            let values: Vec<Option<Decimal>> = items
                .iter()
                .enumerate()
                .map(|(i, n)| ctx.number(n, &index(&row_path, i)))
                .collect();
            values.into_iter().collect::<Option<Vec<Decimal>>>()
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
/// `groups` and `metadata_list`, checked by the same rules (and the same constructor) as the seed.
/// A consumer as Redis keeps it (`seed::record`), or the operator's tombstone for a deleted one.
pub enum ConsumerRecord {
    Live(Box<Consumer>),
    /// `{"username":…,"deleted":true}`: deleted by an operator (SPEC §10).
    Deleted(String),
}

/// A Redis consumer record, checked by the seed's rules. `label` names it in problems.
pub fn consumer_record(root: &Node, label: &str) -> Result<ConsumerRecord, Vec<Problem>> {
    let mut ctx = Ctx::new(label);
    if let Some(map) = as_map(root)
        && matches!(
            get(map, "deleted").map(|n| &n.value),
            Some(Value::Bool(true))
        )
    {
        ctx.reject_unknown(map, "", &["username", "deleted"]);
        let username = ctx
            .required(map, root.line, "", "username")
            .and_then(|n| ctx.text(n, "username", Text::Username));
        return match username {
            Some(name) if ctx.problems.is_empty() => Ok(ConsumerRecord::Deleted(name)),
            _ => Err(ctx.problems),
        };
    }
    let fields = ["username", "custom_id", "groups", "tags", "metadata_list"];
    let consumer = ctx.map(root, "").and_then(|map| {
        ctx.reject_unknown(map, "", &fields);
        let username = ctx
            .required(map, root.line, "", "username")
            .and_then(|n| ctx.text(n, "username", Text::Username));
        let groups = ctx.string_list(map, "", "groups", Text::Group);
        consumer_fields(&mut ctx, root, map, username, groups)
    });
    finish(ctx, consumer).map(|c| ConsumerRecord::Live(Box::new(c)))
}

/// A consumer as the admin API takes it (SPEC §10): the seed's shapes and names — `custom_id`,
/// `tags`, `acls: [{group}]`, `metadata_list` — checked by the seed's rules, with field paths
/// relative to the body. `username` comes from the path; a body may repeat it, not change it.
pub fn admin_consumer(root: &Node, username: &str) -> Result<Consumer, Vec<Problem>> {
    let mut ctx = Ctx::new("body");
    let consumer = ctx.map(root, "").and_then(|map| {
        ctx.reject_unknown(
            map,
            "",
            &["username", "custom_id", "tags", "acls", "metadata_list"],
        );
        if let Some(given) = optional(map, "username")
            && !matches!(&given.value, Value::Str(s) if &**s == username)
        {
            ctx.report(
                given.line,
                "username",
                "must equal the username in the path",
            );
        }
        let mut groups: Vec<String> = Vec::new();
        for item in ctx.maps_in(map, "", "acls") {
            ctx.reject_unknown(item.map, &item.path, &["group"]);
            if let Some(group) = acl_group(&mut ctx, &item)
                && !groups.contains(&group)
            {
                groups.push(group);
            }
        }
        let name = Node {
            line: root.line,
            value: Value::Str(username.into()),
        };
        let username = ctx.text(&name, "username", Text::Username);
        consumer_fields(&mut ctx, root, map, username, groups)
    });
    finish(ctx, consumer)
}

/// The fields a Redis record and an admin body share, checked by the seed's rules.
fn consumer_fields(
    ctx: &mut Ctx,
    root: &Node,
    map: &Map,
    username: Option<String>,
    groups: Vec<String>,
) -> Option<Consumer> {
    let custom_id =
        optional(map, "custom_id").and_then(|n| ctx.text(n, "custom_id", Text::Printable));
    let tags = match optional(map, "tags") {
        Some(n) => tags(ctx, n, "tags").unwrap_or_default(),
        None => Vec::new(),
    };
    let metadata =
        optional(map, "metadata_list").and_then(|n| metadata_list(ctx, n, "metadata_list"));
    let mut consumer = Consumer::new(username?, custom_id, groups, metadata)
        .map_err(|e| ctx.report(root.line, "", e.to_string()))
        .ok()?;
    consumer.tags = tags;
    Some(consumer)
}

fn finish(ctx: Ctx, consumer: Option<Consumer>) -> Result<Consumer, Vec<Problem>> {
    match consumer {
        Some(consumer) if ctx.problems.is_empty() => Ok(consumer),
        _ if ctx.problems.is_empty() => Err(vec![Problem {
            file: ctx.file,
            line: None,
            path: String::new(),
            reason: "not a valid consumer record".into(),
        }]),
        _ => Err(ctx.problems),
    }
}

fn as_map(node: &Node) -> Option<&Map> {
    match &node.value {
        Value::Map(map) => Some(map),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::core::limits::SlotLimit;
    use crate::core::model::SLOTS;

    const MATRIX: &str = "{T1: [0], T2: [0], T3: [0], T4: [0], T5: [0], T6: [0], T7: [0], T8: [0], T9: [0], T10: [0], T11: [0], T12: [0]}";

    /// The one entry of a one-consumer seed whose entry ends with `extra` (inline YAML fields).
    fn entry_with(extra: &str) -> std::sync::Arc<crate::core::Entry> {
        let text = format!(
            "consumers:\n  - username: u\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n            - {{id: e, provider_name: p, tdl_matrix: {MATRIX}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: 5e-08, output_cost_per_token: 0.0000002{extra}}}\n"
        );
        let seed = super::super::parse_text(&text, "t.yaml").unwrap();
        let (consumer, _) = seed.consumers.into_iter().next().unwrap();
        consumer.metadata.as_ref().unwrap().entries()[0].clone()
    }

    #[test]
    fn the_entry_json_carries_the_limits_exactly() {
        let entry = entry_with(
            ", limits: {requests_per_minute: 60, requests_per_slot: {T7: 5}, cost_per_day: 0.50}",
        );
        assert!(
            entry.json().ends_with(
                r#","output_cost_per_token":0.0000002,"limits":{"requests_per_minute":60,"requests_per_slot":{"T7":5},"cost_per_day":0.5}}"#
            ),
            "{}",
            entry.json()
        );
        let limits = entry.fields.limits.as_ref().unwrap();
        let mut slots = [None; SLOTS];
        slots[6] = Some(5);
        assert_eq!(limits.requests_per_slot, Some(SlotLimit::Some(slots)));
        assert_eq!(limits.requests_per_day, None);
    }

    #[test]
    fn empty_or_null_limits_are_no_limits() {
        let plain = entry_with("");
        assert!(plain.fields.limits.is_none());
        for extra in [
            ", limits: {}",
            ", limits: null",
            ", limits: {requests_per_slot: {}}",
        ] {
            let entry = entry_with(extra);
            assert!(entry.fields.limits.is_none(), "{extra}");
            // The same entry as one written without the block, JSON form included.
            assert_eq!(entry.json(), plain.json(), "{extra}");
        }
    }

    #[test]
    fn the_largest_amounts_are_accepted() {
        let entry = entry_with(
            ", limits: {requests_per_day: 999999999999999, cost_per_month: 999999999999999, cost_per_day: 0.000000000001}",
        );
        let limits = entry.fields.limits.as_ref().unwrap();
        assert_eq!(limits.requests_per_day, Some(999_999_999_999_999));
        assert_eq!(
            limits.cost_per_month.unwrap().to_units(12),
            Some(999_999_999_999_999_000_000_000_000)
        );
        assert_eq!(limits.cost_per_day.unwrap().to_units(12), Some(1));
    }

    #[test]
    fn models_are_kept_and_written_in_the_entry_json() {
        let entry = entry_with(", models: [gpt-4o, \"gpt-4.1*\", \"*\"]");
        assert_eq!(
            entry.fields.models.as_deref(),
            Some(&["gpt-4o".to_owned(), "gpt-4.1*".to_owned(), "*".to_owned()][..])
        );
        assert!(
            entry
                .json()
                .ends_with(r#","models":["gpt-4o","gpt-4.1*","*"]}"#),
            "{}",
            entry.json()
        );
        assert!(entry_with(", models: null").fields.models.is_none());
        assert_eq!(entry_with(", models: null").json(), entry_with("").json());
    }

    #[test]
    fn invalid_models_are_refused_with_their_path() {
        for (extra, path, reason) in [
            (", models: []", "models", "must name at least one model"),
            (", models: [\"gpt 4o\"]", "models[0]", "visible ASCII"),
            (", models: [\"\"]", "models[0]", "must not be empty"),
            (
                ", models: [a, \"g*t\"]",
                "models[1]",
                "only be the last character",
            ),
            (
                ", models: [\"**\"]",
                "models[0]",
                "only be the last character",
            ),
            (", models: [1]", "models[0]", "expected a string"),
            (", models: gpt-4o", "models", "expected a list"),
        ] {
            let text = format!(
                "consumers:\n  - username: u\n    plugins:\n      - name: user-metadata\n        config:\n          metadata_list:\n            - {{id: e, provider_name: p, tdl_matrix: {MATRIX}, capabilities: [1], max_input_tokens: 1, max_output_tokens: 1, input_cost_per_token: 0, output_cost_per_token: 0{extra}}}\n"
            );
            let problems = super::super::parse_text(&text, "t.yaml").unwrap_err();
            let want = format!("consumers[0].plugins[0].config.metadata_list[0].{path}");
            assert!(
                problems
                    .iter()
                    .any(|p| p.path == want && p.reason.contains(reason)),
                "{extra}: {problems:?}"
            );
        }
    }
}
