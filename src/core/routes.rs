//! Routes and ACLs: which seed routes and which config route an original request falls under.
//!
//! The two sets are matched independently (SPEC §5). A route path is a plain string prefix compared
//! without regard to ASCII case (Kong's and nginx's prefix match: `/gpt4o/chat` covers
//! `/gpt4o/chatter`), or a Kong regex (`~`) anchored at the start of the normalized path; the longest
//! match wins. `methods` and `hosts` choose among the seed routes whose paths match, but never remove
//! an ACL: when none of them fits the request, all of them apply their ACL and key-auth. The route a
//! plain (unnormalized) reading of the path falls under applies its ACL too, because some upstream may
//! read the path that way.
//!
//! A small table (the usual few routes) is scanned; a large one is looked up by hashing the path's
//! prefixes at each length some route prefix has, so it costs a few lookups, not the number of routes.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use super::model::{Consumer, MetadataList};
use super::path::{prefix_key, prefix_matches};

/// Up to this many prefixes a scan beats hashing.
const SCAN_LIMIT: usize = 32;

/// Kong's `acl` plugin: with `allow`, one of the groups is needed; with `deny`, none may be held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Acl {
    pub fn permits(&self, consumer: &Consumer) -> bool {
        (self.allow.is_empty() || consumer.in_any_group(&self.allow))
            && !consumer.in_any_group(&self.deny)
    }
}

/// Kong's `key-auth` plugin: where the key is looked for (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuth {
    /// Lower-case names, tried in order, each as a header and then as a query parameter.
    pub key_names: Vec<String>,
    pub in_header: bool,
    pub in_query: bool,
}

impl Default for KeyAuth {
    fn default() -> Self {
        KeyAuth {
            key_names: vec!["apikey".to_owned()],
            in_header: true,
            in_query: true,
        }
    }
}

/// A seed route's host: exact, or `*.example.com` (any name ending in `.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// The suffix with its leading dot.
    Wildcard(String),
}

impl HostPattern {
    /// From a seed value: lower-cased, without a trailing dot or a port.
    pub fn parse(written: &str) -> HostPattern {
        let host = normalize_host(written);
        match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostPattern::Wildcard(suffix.to_owned()),
            _ => HostPattern::Exact(host),
        }
    }

    /// `host` comes from [`normalize_host`].
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

/// A host as routes compare it: lower-case, without a port or a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = match host.strip_prefix('[') {
        // `[::1]:8080` → `[::1]`
        Some(rest) => rest
            .split_once(']')
            .map_or(host, |(inside, _)| &host[..inside.len() + 2]),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// How a route path is matched.
#[derive(Debug, Clone)]
pub enum RoutePath {
    Prefix(String),
    /// A Kong regex path (written with a leading `~`), anchored at the start.
    Regex(regex::Regex),
}

impl RoutePath {
    /// `~/gpt[0-9]+/chat` becomes an anchored, case-insensitive regex; anything else a prefix.
    pub fn parse(written: &str) -> Result<RoutePath, String> {
        match written.strip_prefix('~') {
            Some(pattern) => regex::RegexBuilder::new(&format!("^(?:{pattern})"))
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map(RoutePath::Regex)
                .map_err(|e| format!("not a valid regular expression: {}", first_line(&e))),
            None => Ok(RoutePath::Prefix(prefix_key(written))),
        }
    }
}

fn first_line(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines().last().unwrap_or("").trim().to_owned()
}

/// A route from the seed file (Kong format), with the plugins that apply to it already chosen by
/// Kong's precedence (route, then service, then global).
#[derive(Debug, Default)]
pub struct SeedRoute {
    pub name: String,
    /// Upper-case method names; empty means every method.
    pub methods: Vec<String>,
    pub hosts: Vec<HostPattern>,
    pub acl: Option<Acl>,
    pub key_auth: Option<KeyAuth>,
    /// The route-level (or service-level) `user-metadata` list, for consumers without their own.
    pub metadata: Option<Arc<MetadataList>>,
    /// Capability indexes the chosen entry must have: what every `user-metadata` instance that
    /// applies to the route requires, added together (SPEC §5, §8.2).
    pub require_capabilities: Vec<usize>,
}

impl SeedRoute {
    /// Whether the route's `methods` and `hosts` admit the request (`host` normalized, if any).
    fn fits(&self, method: &str, host: Option<&str>) -> bool {
        let method_ok =
            self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
        let host_ok =
            self.hosts.is_empty() || host.is_some_and(|h| self.hosts.iter().any(|p| p.matches(h)));
        method_ok && host_ok
    }
}

/// A `[[routes]]` table of the config file: the operator's pin and groups.
#[derive(Debug, Default, Clone)]
pub struct ConfigRoute {
    pub prefix: String,
    pub metadata_id: Option<String>,
    pub acl: Acl,
    /// Capability indexes the chosen entry must have (SPEC §8.2).
    pub require_capabilities: Vec<usize>,
}

/// Routes indexed by path.
#[derive(Debug)]
pub struct RouteTable<R> {
    routes: Vec<Arc<R>>,
    /// (prefix key, route index), longest first.
    prefixes: Vec<(String, usize)>,
    /// Large tables: lower-case prefix key → routes, and the distinct key lengths, longest first.
    by_prefix: HashMap<String, Vec<usize>>,
    lengths: Vec<usize>,
    /// (regex, its length as written, route index).
    regexes: Vec<(regex::Regex, usize, usize)>,
}

impl<R> Default for RouteTable<R> {
    fn default() -> Self {
        RouteTable {
            routes: Vec::new(),
            prefixes: Vec::new(),
            by_prefix: HashMap::default(),
            lengths: Vec::new(),
            regexes: Vec::new(),
        }
    }
}

/// A route whose path matched, with the length that ranks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    length: usize,
    index: usize,
}

impl<R> RouteTable<R> {
    /// Adds a route under each of its paths (`written` is the path as in the seed, for regex length).
    pub fn insert(&mut self, route: R, paths: &[(RoutePath, usize)]) {
        let index = self.routes.len();
        self.routes.push(Arc::new(route));
        for (path, written_len) in paths {
            match path {
                RoutePath::Prefix(key) => self.prefixes.push((key.clone(), index)),
                RoutePath::Regex(re) => self.regexes.push((re.clone(), *written_len, index)),
            }
        }
        self.prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        self.by_prefix.clear();
        if self.prefixes.len() > SCAN_LIMIT {
            for (key, i) in &self.prefixes {
                self.by_prefix.entry(key.clone()).or_default().push(*i);
            }
            self.lengths = self.prefixes.iter().map(|(k, _)| k.len()).collect();
            self.lengths.dedup();
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn routes(&self) -> impl Iterator<Item = &R> {
        self.routes.iter().map(|r| &**r)
    }

    pub fn by_name(&self, name: &str) -> Option<&R>
    where
        R: Named,
    {
        self.routes().find(|r| r.name() == name)
    }

    /// Every route whose paths match the normalized `path`.
    fn candidates<'t>(&'t self, path: &'t str) -> impl Iterator<Item = Candidate> + 't {
        let regexes = self
            .regexes
            .iter()
            .filter(move |(re, _, _)| re.is_match(path))
            .map(|&(_, length, index)| Candidate { length, index });
        let scanned = self
            .by_prefix
            .is_empty()
            .then(|| {
                self.prefixes
                    .iter()
                    .filter(move |(key, _)| prefix_matches(key, path))
                    .map(|(key, index)| Candidate {
                        length: key.len(),
                        index: *index,
                    })
            })
            .into_iter()
            .flatten();
        let hashed = (!self.by_prefix.is_empty())
            .then(|| self.hashed_candidates(path))
            .into_iter()
            .flatten();
        regexes.chain(scanned).chain(hashed)
    }

    fn hashed_candidates(&self, path: &str) -> impl Iterator<Item = Candidate> + '_ {
        let lowered = path.to_ascii_lowercase();
        let found: Vec<Candidate> = self
            .lengths
            .iter()
            .filter(|&&length| length <= lowered.len())
            .filter_map(|&length| Some((length, self.by_prefix.get(lowered.get(..length)?)?)))
            .flat_map(|(length, indexes)| {
                indexes
                    .iter()
                    .map(move |&index| Candidate { length, index })
            })
            .collect();
        found.into_iter()
    }

    fn route(&self, candidate: Candidate) -> &R {
        &self.routes[candidate.index]
    }
}

/// Something with a name a gateway can give in `X-Uma-Route`.
pub trait Named {
    fn name(&self) -> &str;
}

impl Named for SeedRoute {
    fn name(&self) -> &str {
        &self.name
    }
}

impl RouteTable<ConfigRoute> {
    /// The longest matching config route (earlier wins ties).
    pub fn find(&self, path: &str) -> Option<&ConfigRoute> {
        self.candidates(path)
            .max_by(|a, b| a.length.cmp(&b.length).then(b.index.cmp(&a.index)))
            .map(|c| self.route(c))
    }
}

/// What the seed routes say about a request.
#[derive(Debug)]
pub enum SeedMatch<'p> {
    /// No seed route covers the path: only global plugins apply.
    None,
    /// The route that decides: its ACL, key-auth and route list.
    Route(&'p SeedRoute),
    /// Every route covering the path excludes the method or host: each applies its ACL and
    /// key-auth, none supplies a list.
    Excluded(Vec<&'p SeedRoute>),
    /// `X-Uma-Route` named a route the seed does not have (403).
    UnknownName,
}

impl RouteTable<SeedRoute> {
    /// The seed routes for a normalized path, method and host (SPEC §5).
    pub fn select(&self, path: &str, method: &str, host: Option<&str>) -> SeedMatch<'_> {
        let rank = |c: &Candidate| {
            let route = self.route(*c);
            (
                c.length,
                !route.hosts.is_empty(),
                !route.methods.is_empty(),
                std::cmp::Reverse(c.index),
            )
        };
        let best = self
            .candidates(path)
            .filter(|c| self.route(*c).fits(method, host))
            .max_by_key(rank);
        if let Some(best) = best {
            return SeedMatch::Route(self.route(best));
        }
        let mut excluded: Vec<Candidate> = self.candidates(path).collect();
        if excluded.is_empty() {
            return SeedMatch::None;
        }
        excluded.sort_by_key(|c| std::cmp::Reverse(rank(c)));
        excluded.dedup_by_key(|c| c.index);
        SeedMatch::Excluded(excluded.into_iter().map(|c| self.route(c)).collect())
    }

    /// The route a gateway named in `X-Uma-Route`.
    pub fn named(&self, name: &str) -> SeedMatch<'_> {
        self.by_name(name)
            .map_or(SeedMatch::UnknownName, SeedMatch::Route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> (RoutePath, usize) {
        (RoutePath::parse(p).unwrap(), p.len())
    }

    fn seed_route(name: &str, methods: &[&str], hosts: &[&str]) -> SeedRoute {
        SeedRoute {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            hosts: hosts.iter().map(|h| HostPattern::parse(h)).collect(),
            ..SeedRoute::default()
        }
    }

    fn name(m: SeedMatch) -> String {
        match m {
            SeedMatch::None => "-".into(),
            SeedMatch::Route(r) => r.name.clone(),
            SeedMatch::Excluded(rs) => {
                format!(
                    "excluded:{}",
                    rs.iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            SeedMatch::UnknownName => "unknown".into(),
        }
    }

    fn table() -> RouteTable<SeedRoute> {
        let mut t = RouteTable::default();
        t.insert(seed_route("chat", &["POST"], &[]), &[prefix("/gpt4o/chat")]);
        t.insert(seed_route("gpt4o", &[], &[]), &[prefix("/gpt4o/")]);
        t.insert(
            seed_route("get-chat", &["GET"], &[]),
            &[prefix("/gpt4o/chat")],
        );
        t
    }

    #[test]
    fn plain_prefixes_longest_first() {
        let t = table();
        assert_eq!(name(t.select("/gpt4o/chat/x", "POST", None)), "chat");
        assert_eq!(name(t.select("/gpt4o/chatter", "POST", None)), "chat");
        assert_eq!(name(t.select("/GPT4O/Chat", "POST", None)), "chat");
        assert_eq!(name(t.select("/gpt4o/x", "POST", None)), "gpt4o");
        assert_eq!(name(t.select("/gpt4o", "POST", None)), "-");
        assert_eq!(name(t.select("/gpt4", "POST", None)), "-");
    }

    #[test]
    fn methods_choose_among_routes() {
        let t = table();
        assert_eq!(name(t.select("/gpt4o/chat", "GET", None)), "get-chat");
        assert_eq!(name(t.select("/gpt4o/chat", "post", None)), "chat");
        // A shorter route that fits beats longer ones that exclude the method.
        assert_eq!(name(t.select("/gpt4o/chat", "PUT", None)), "gpt4o");
    }

    #[test]
    fn when_no_route_fits_every_matching_route_applies() {
        let mut t = RouteTable::default();
        t.insert(
            seed_route("midm", &["POST"], &[]),
            &[prefix("/midm-base/chat")],
        );
        t.insert(
            seed_route("midm-get", &["GET"], &["api.example.com"]),
            &[prefix("/midm-base/")],
        );
        assert_eq!(
            name(t.select("/midm-base/chat", "GET", None)),
            "excluded:midm,midm-get"
        );
        assert_eq!(
            name(t.select("/midm-base/chat", "GET", Some("api.example.com"))),
            "midm-get"
        );
    }

    #[test]
    fn hosts_choose_and_win_ties() {
        let mut t = RouteTable::default();
        t.insert(seed_route("any", &[], &[]), &[prefix("/v1")]);
        t.insert(
            seed_route("wild", &[], &["*.example.com"]),
            &[prefix("/v1")],
        );
        t.insert(
            seed_route("exact", &[], &["api.other.org"]),
            &[prefix("/v1")],
        );
        assert_eq!(
            name(t.select("/v1/chat", "GET", Some("a.example.com"))),
            "wild"
        );
        assert_eq!(
            name(t.select("/v1/chat", "GET", Some("a.b.example.com"))),
            "wild"
        );
        assert_eq!(
            name(t.select("/v1/chat", "GET", Some("example.com"))),
            "any"
        );
        assert_eq!(
            name(t.select("/v1/chat", "GET", Some("api.other.org"))),
            "exact"
        );
        assert_eq!(name(t.select("/v1/chat", "GET", None)), "any");
    }

    #[test]
    fn hosts_are_compared_without_case_port_or_trailing_dot() {
        assert_eq!(normalize_host("API.Example.com.:8443"), "api.example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
        assert!(HostPattern::parse("*.Example.COM").matches("x.example.com"));
        assert!(!HostPattern::parse("*.example.com").matches("example.com"));
    }

    #[test]
    fn regex_paths_are_anchored_and_ranked_by_written_length() {
        let mut t = RouteTable::default();
        t.insert(seed_route("re", &[], &[]), &[prefix("~/gpt[0-9]+/chat")]);
        t.insert(seed_route("short", &[], &[]), &[prefix("/gpt4")]);
        assert_eq!(name(t.select("/gpt4/chat", "GET", None)), "re");
        assert_eq!(name(t.select("/GPT4/CHAT/x", "GET", None)), "re");
        assert_eq!(name(t.select("/x/gpt4/chat", "GET", None)), "-");
        assert_eq!(name(t.select("/gpt4/other", "GET", None)), "short");
        assert!(RoutePath::parse("~/gpt(").is_err());
    }

    #[test]
    fn large_tables_match_like_small_ones() {
        let mut t = table();
        for i in 0..SCAN_LIMIT {
            t.insert(
                seed_route(&format!("filler-{i}"), &[], &[]),
                &[prefix(&format!("/filler/{i}"))],
            );
        }
        assert!(!t.by_prefix.is_empty());
        assert_eq!(name(t.select("/gpt4o/chat/x", "POST", None)), "chat");
        assert_eq!(name(t.select("/gpt4o/chat", "GET", None)), "get-chat");
        assert_eq!(name(t.select("/GPT4O/chatter", "POST", None)), "chat");
        assert_eq!(name(t.select("/filler/7/x", "PUT", None)), "filler-7");
        assert_eq!(name(t.select("/filler/12", "PUT", None)), "filler-12");
        assert_eq!(name(t.select("/gpt4", "POST", None)), "-");
    }

    #[test]
    fn root_prefix_matches_everything() {
        let mut t = RouteTable::default();
        t.insert(seed_route("root", &[], &[]), &[prefix("/")]);
        assert_eq!(name(t.select("/x/y", "GET", None)), "root");
        assert_eq!(name(t.select("/", "GET", None)), "root");
    }

    #[test]
    fn routes_can_be_named() {
        let t = table();
        assert_eq!(name(t.named("gpt4o")), "gpt4o");
        assert_eq!(name(t.named("nope")), "unknown");
    }

    #[test]
    fn config_routes_longest_prefix() {
        let mut t = RouteTable::default();
        for p in ["/gpt4o", "/gpt4o/chat"] {
            t.insert(
                ConfigRoute {
                    prefix: p.into(),
                    ..ConfigRoute::default()
                },
                &[prefix(p)],
            );
        }
        assert_eq!(t.find("/gpt4o/chatter").unwrap().prefix, "/gpt4o/chat");
        assert_eq!(t.find("/GPT4O/x").unwrap().prefix, "/gpt4o");
        assert!(t.find("/gpt").is_none());
    }

    #[test]
    fn acl_allow_and_deny() {
        let c = Consumer::new("u".into(), None, vec!["a".into()], None).unwrap();
        let acl = |allow: &[&str], deny: &[&str]| Acl {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        };
        assert!(Acl::default().permits(&c));
        assert!(acl(&["a"], &[]).permits(&c));
        assert!(!acl(&["b"], &[]).permits(&c));
        assert!(!acl(&[], &["a"]).permits(&c));
        assert!(acl(&[], &["b"]).permits(&c));
    }
}
