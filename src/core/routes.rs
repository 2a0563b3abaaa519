//! Routes and ACLs: which seed route and which config route an original request falls under.
//!
//! The two sets are matched independently (SPEC §5), each by the longest whole-segment prefix.
//! A small table (the usual few routes) is scanned longest prefix first; a large one is looked up by
//! walking the request path's ancestors (`/a/b/c`, `/a/b`, `/a`, root) through a hash map, so it
//! costs the path's depth, not the number of routes.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use super::model::{Consumer, MetadataList};
use super::path::{ancestors, prefix_key, segment_prefix_matches};

/// Up to this many prefixes a scan beats hashing every ancestor of the path.
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

/// A route from the seed file (Kong format).
#[derive(Debug, Default)]
pub struct SeedRoute {
    pub name: String,
    /// Upper-case method names; empty means every method.
    pub methods: Vec<String>,
    pub acl: Acl,
    /// The route-level `user-metadata` list, for consumers without their own.
    pub metadata: Option<Arc<MetadataList>>,
}

/// A `[[routes]]` table of the config file: the operator's pin and groups.
#[derive(Debug, Default, Clone)]
pub struct ConfigRoute {
    pub prefix: String,
    pub metadata_id: Option<String>,
    pub acl: Acl,
}

/// Something a route table can hold: it may restrict methods.
pub trait Route {
    fn accepts_method(&self, method: &str) -> bool;
}

impl Route for SeedRoute {
    fn accepts_method(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }
}

impl Route for ConfigRoute {
    fn accepts_method(&self, _method: &str) -> bool {
        true
    }
}

/// Routes indexed by prefix key.
#[derive(Debug)]
pub struct RouteTable<R> {
    routes: Vec<Arc<R>>,
    by_prefix: HashMap<String, Vec<usize>>,
    /// The same prefixes, longest first.
    longest_first: Vec<(String, Vec<usize>)>,
}

impl<R> Default for RouteTable<R> {
    fn default() -> Self {
        RouteTable {
            routes: Vec::new(),
            by_prefix: HashMap::default(),
            longest_first: Vec::new(),
        }
    }
}

impl<R: Route> RouteTable<R> {
    /// Adds a route under each of its prefixes. Earlier routes win ties on the same prefix.
    pub fn insert(&mut self, route: R, prefixes: &[String]) {
        let index = self.routes.len();
        self.routes.push(Arc::new(route));
        for prefix in prefixes {
            let slots = self.by_prefix.entry(prefix_key(prefix)).or_default();
            if !slots.contains(&index) {
                slots.push(index);
            }
        }
        self.longest_first = self
            .by_prefix
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.longest_first
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route for a normalized path. Routes whose `methods` accept the method are preferred, as
    /// Kong would; when only routes for other methods cover the path, the longest of those still
    /// applies, because we cannot answer 404 as Kong would and an ACL must never be skipped just
    /// because the gateway sent (or an nginx subrequest defaulted to) another method.
    pub fn find(&self, path: &str, method: &str) -> Option<&R> {
        self.longest(path, |r| r.accepts_method(method))
            .or_else(|| self.longest(path, |_| true))
    }

    fn longest(&self, path: &str, accept: impl Fn(&R) -> bool) -> Option<&R> {
        let pick = |slots: &Vec<usize>| slots.iter().map(|&i| &*self.routes[i]).find(|r| accept(r));
        if self.longest_first.len() <= SCAN_LIMIT {
            return self
                .longest_first
                .iter()
                .filter(|(key, _)| segment_prefix_matches(key, path))
                .find_map(|(_, slots)| pick(slots));
        }
        ancestors(path).find_map(|key| pick(self.by_prefix.get(key)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_route(name: &str, methods: &[&str]) -> SeedRoute {
        SeedRoute {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            ..SeedRoute::default()
        }
    }

    fn table() -> RouteTable<SeedRoute> {
        let mut t = RouteTable::default();
        t.insert(seed_route("chat", &["POST"]), &["/gpt4o/chat".into()]);
        t.insert(seed_route("gpt4o", &[]), &["/gpt4o/".into()]);
        t.insert(seed_route("get-chat", &["GET"]), &["/gpt4o/chat".into()]);
        t
    }

    #[test]
    fn longest_prefix_on_whole_segments() {
        let t = table();
        assert_eq!(t.find("/gpt4o/chat/x", "POST").unwrap().name, "chat");
        assert_eq!(t.find("/gpt4o/chatter", "POST").unwrap().name, "gpt4o");
        assert_eq!(t.find("/gpt4o", "POST").unwrap().name, "gpt4o");
        assert!(t.find("/gpt4", "POST").is_none());
    }

    #[test]
    fn methods_choose_among_routes() {
        let t = table();
        assert_eq!(t.find("/gpt4o/chat", "GET").unwrap().name, "get-chat");
        assert_eq!(t.find("/gpt4o/chat", "post").unwrap().name, "chat");
    }

    #[test]
    fn a_method_mismatch_never_drops_the_route() {
        let mut t = RouteTable::default();
        t.insert(seed_route("midm", &["POST"]), &["/midm-base/chat".into()]);
        assert_eq!(t.find("/midm-base/chat", "GET").unwrap().name, "midm");
    }

    #[test]
    fn large_tables_match_like_small_ones() {
        let mut t = table();
        for i in 0..SCAN_LIMIT {
            t.insert(
                seed_route(&format!("filler-{i}"), &[]),
                &[format!("/filler/{i}")],
            );
        }
        assert!(t.longest_first.len() > SCAN_LIMIT);
        assert_eq!(t.find("/gpt4o/chat/x", "POST").unwrap().name, "chat");
        assert_eq!(t.find("/gpt4o/chat", "GET").unwrap().name, "get-chat");
        assert_eq!(t.find("/gpt4o/chatter", "POST").unwrap().name, "gpt4o");
        assert_eq!(t.find("/filler/7/x", "PUT").unwrap().name, "filler-7");
        assert!(t.find("/gpt4", "POST").is_none());
    }

    #[test]
    fn root_prefix_matches_everything() {
        let mut t = RouteTable::default();
        t.insert(seed_route("root", &[]), &["/".into()]);
        assert_eq!(t.find("/x/y", "GET").unwrap().name, "root");
        assert_eq!(t.find("/", "GET").unwrap().name, "root");
    }

    #[test]
    fn acl_allow_and_deny() {
        let c = Consumer::new("u".into(), None, vec!["a".into()], None).unwrap();
        assert!(Acl::default().permits(&c));
        assert!(
            Acl {
                allow: vec!["a".into()],
                deny: vec![]
            }
            .permits(&c)
        );
        assert!(
            !Acl {
                allow: vec!["b".into()],
                deny: vec![]
            }
            .permits(&c)
        );
        assert!(
            !Acl {
                allow: vec![],
                deny: vec!["a".into()]
            }
            .permits(&c)
        );
        assert!(
            Acl {
                allow: vec![],
                deny: vec!["b".into()]
            }
            .permits(&c)
        );
    }
}
