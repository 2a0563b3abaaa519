//! The decision: request → routes → key → consumer → applicable list → entry, or a [`Refusal`].
//!
//! Pure functions over a loaded [`Catalog`]: no I/O, no clock. The HTTP adapter runs the steps in
//! SPEC §4's order (it looks the consumer up between them, which may ask Redis), turns a refusal into
//! an answer and counts an allowed call.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use super::capability::{CapabilityNames, first_missing};
use super::key::KeyHash;
use super::model::{Consumer, Entry, MetadataList};
use super::path::prefix_key;
use super::refusal::{Forbidden, Refusal};
use super::request::{AuthRequest, KeyPresence, OriginalRequest};
use super::routes::{
    Acl, ConfigRoute, KeyAuth, RoutePath, RouteTable, SeedMatch, SeedRoute, normalize_host,
};

/// The routes, plugins and default list that apply to every consumer.
#[derive(Debug, Default)]
pub struct Policy {
    pub seed_routes: RouteTable<SeedRoute>,
    pub config_routes: RouteTable<ConfigRoute>,
    /// The global `user-metadata` plugin's list.
    pub global: Option<Arc<MetadataList>>,
    /// Unscoped top-level `acl` and `key-auth`: for URIs that match no seed route (routes carry
    /// them already, when nothing more specific applies).
    pub global_acl: Option<Acl>,
    pub global_key_auth: Option<KeyAuth>,
    /// Whether any seed route has `hosts` (set by [`Policy::build`]): only then is the request's
    /// host normalized.
    pub routes_use_hosts: bool,
    /// What the global `user-metadata` plugin requires, for URIs that match no seed route.
    pub global_require_capabilities: Vec<usize>,
    /// `capabilities.names`, to name a missing capability.
    pub capability_names: CapabilityNames,
}

/// Everything loaded from the seed and config: consumers by key digest, and the policy.
#[derive(Debug, Default)]
pub struct Catalog {
    pub consumers: Vec<Arc<Consumer>>,
    pub by_key: HashMap<KeyHash, Arc<Consumer>>,
    pub by_name: HashMap<Arc<str>, Arc<Consumer>>,
    pub policy: Policy,
    /// SHA-256 of the seed text the catalog was read from, when it was read from a file: a reload
    /// on a file change skips a seed whose bytes are the running one's.
    pub seed_digest: Option<[u8; 32]>,
}

impl Catalog {
    /// Indexes consumers by key digest. Seed and config are already validated.
    pub fn new(consumers: Vec<(Arc<Consumer>, Vec<KeyHash>)>, policy: Policy) -> Catalog {
        let mut catalog = Catalog {
            policy,
            ..Catalog::default()
        };
        for (consumer, keys) in consumers {
            for key in keys {
                catalog.by_key.insert(key, consumer.clone());
            }
            catalog
                .by_name
                .insert(consumer.username.clone(), consumer.clone());
            catalog.consumers.push(consumer);
        }
        catalog
    }

    /// Every metadata list: the consumers' own, the seed routes' (in seed order), the global one.
    pub fn lists(&self) -> impl Iterator<Item = &Arc<MetadataList>> {
        self.consumers
            .iter()
            .filter_map(|c| c.metadata.as_ref())
            .chain(
                self.policy
                    .seed_routes
                    .routes()
                    .filter_map(|r| r.metadata.as_ref()),
            )
            .chain(self.policy.global.as_ref())
    }

    pub fn entry_count(&self) -> usize {
        self.lists().map(|l| l.entries().len()).sum()
    }

    /// Entries with a `limits` block, counted like [`Catalog::entry_count`] (once per list).
    pub fn entries_with_limits(&self) -> usize {
        self.lists()
            .flat_map(|l| l.entries())
            .filter(|e| e.fields.limits.is_some())
            .count()
    }

    /// Whether some list holds an entry with this id.
    pub fn has_entry(&self, id: &str) -> bool {
        self.lists().any(|l| l.find(id).is_some())
    }
}

/// What the request's routes say about it.
#[derive(Debug)]
pub struct RouteMatch<'p> {
    pub seed: SeedMatch<'p>,
    /// The seed routes a plain reading of the path falls under, when they are others: their ACL
    /// and key-auth apply too.
    pub plain_seed: Vec<&'p SeedRoute>,
    pub config: Option<&'p ConfigRoute>,
    /// Likewise for config routes: the plain reading's route adds its groups, not its pin.
    pub plain_config: Option<&'p ConfigRoute>,
}

impl<'p> RouteMatch<'p> {
    /// The seed routes whose `acl` and `key-auth` must allow the call.
    fn seed_routes(&self) -> impl Iterator<Item = &'p SeedRoute> + '_ {
        let primary: &[&'p SeedRoute] = match &self.seed {
            SeedMatch::Route(route) => std::slice::from_ref(route),
            SeedMatch::Excluded(routes) => routes,
            SeedMatch::None | SeedMatch::UnknownName => &[],
        };
        primary.iter().chain(&self.plain_seed).copied()
    }

    /// The route whose list applies to consumers without their own.
    fn list_route(&self) -> Option<&'p SeedRoute> {
        match self.seed {
            SeedMatch::Route(route) => Some(route),
            _ => None,
        }
    }
}

impl Policy {
    /// Indexes the seed's routes (with their paths) and the config's routes (by prefix).
    pub fn build(
        seed_routes: Vec<(SeedRoute, Vec<(RoutePath, usize)>)>,
        config_routes: Vec<ConfigRoute>,
    ) -> Policy {
        let mut policy = Policy::default();
        for (route, paths) in seed_routes {
            policy.routes_use_hosts |= !route.hosts.is_empty();
            policy.seed_routes.insert(route, &paths);
        }
        for route in config_routes {
            let prefix = (
                RoutePath::Prefix(prefix_key(&route.prefix)),
                route.prefix.len(),
            );
            policy.config_routes.insert(route, &[prefix]);
        }
        policy
    }

    /// Matches both route sets (SPEC §5). `route_name` is a trusted `X-Uma-Route`.
    pub fn route_match(
        &self,
        original: &OriginalRequest,
        route_name: Option<&str>,
    ) -> RouteMatch<'_> {
        let host = original
            .host
            .filter(|_| self.routes_use_hosts)
            .map(normalize_host);
        let select = |path: &str| {
            self.seed_routes
                .select(path, original.method, host.as_deref())
        };
        let seed = match route_name {
            Some(name) => self.seed_routes.named(name),
            None => select(&original.path),
        };
        let plain_seed = match (route_name, original.plain_path.as_deref().map(select)) {
            (None, Some(SeedMatch::Route(plain))) => vec![plain],
            (None, Some(SeedMatch::Excluded(plain))) => plain,
            _ => Vec::new(),
        }
        .into_iter()
        .filter(|plain| !seed_holds(&seed, plain))
        .collect();
        let config = self.config_routes.find(&original.path);
        let plain_config = original
            .plain_path
            .as_deref()
            .and_then(|p| self.config_routes.find(p))
            .filter(|plain| !config.is_some_and(|c| std::ptr::eq(c, *plain)));
        RouteMatch {
            seed,
            plain_seed,
            config,
            plain_config,
        }
    }

    /// The `key-auth` plugins that apply (empty: the default key locations).
    pub fn key_auths<'a>(&'a self, routes: &RouteMatch<'a>) -> Vec<&'a KeyAuth> {
        let mut found: Vec<&KeyAuth> = Vec::new();
        let no_route = matches!(routes.seed, SeedMatch::None | SeedMatch::UnknownName);
        let global = no_route.then_some(self.global_key_auth.as_ref()).flatten();
        for key_auth in routes
            .seed_routes()
            .filter_map(|r| r.key_auth.as_ref())
            .chain(global)
        {
            if !found.contains(&key_auth) {
                found.push(key_auth);
            }
        }
        found
    }

    /// Whether every ACL that applies lets the consumer through (SPEC §5: both route sets).
    pub fn acl_permits(&self, consumer: &Consumer, routes: &RouteMatch) -> bool {
        let no_route = matches!(routes.seed, SeedMatch::None | SeedMatch::UnknownName);
        let global = no_route.then_some(self.global_acl.as_ref()).flatten();
        routes
            .seed_routes()
            .filter_map(|r| r.acl.as_ref())
            .chain(global)
            .all(|acl| acl.permits(consumer))
            && routes
                .config
                .into_iter()
                .chain(routes.plain_config)
                .all(|r| r.acl.permits(consumer))
    }

    /// The consumer's own list, else the route's, else the global one (Kong's plugin precedence).
    pub fn applicable_list<'a>(
        &'a self,
        consumer: &'a Consumer,
        routes: &RouteMatch<'a>,
    ) -> Option<&'a Arc<MetadataList>> {
        consumer
            .metadata
            .as_ref()
            .or_else(|| routes.list_route().and_then(|r| r.metadata.as_ref()))
            .or(self.global.as_ref())
    }

    /// The capabilities the matched routes require, seed routes' first, then the config routes'
    /// (SPEC §8.2: both sets apply).
    pub fn required_capabilities<'a>(
        &'a self,
        routes: &'a RouteMatch<'a>,
    ) -> impl Iterator<Item = usize> + 'a {
        let no_route = matches!(routes.seed, SeedMatch::None | SeedMatch::UnknownName);
        let global: &[usize] = if no_route {
            &self.global_require_capabilities
        } else {
            &[]
        };
        routes
            .seed_routes()
            .flat_map(|r| r.require_capabilities.iter().copied())
            .chain(global.iter().copied())
            .chain(
                routes
                    .config
                    .into_iter()
                    .chain(routes.plain_config)
                    .flat_map(|r| r.require_capabilities.iter().copied()),
            )
    }

    /// The entry `id` a usage record for `consumer` is attributed to (SPEC §9): one the consumer can
    /// be given — in its own list when it has one, else in a seed route's list or the global one.
    /// Validation makes an id identical in every route and global list, so its price is the same
    /// whichever list is found first.
    pub fn usage_entry<'a>(&'a self, consumer: &'a Consumer, id: &str) -> Option<&'a Arc<Entry>> {
        if let Some(own) = &consumer.metadata {
            return own.find(id);
        }
        self.seed_routes
            .routes()
            .filter_map(|r| r.metadata.as_ref())
            .chain(self.global.as_ref())
            .find_map(|l| l.find(id))
    }

    /// Lists that describe an entry id shown by `/api/tdl-matrix` (SPEC §6): the consumer's own,
    /// then the seed routes' in seed order, then the global one.
    pub fn describing_lists<'a>(
        &'a self,
        consumer: &'a Consumer,
    ) -> impl Iterator<Item = &'a Arc<MetadataList>> {
        consumer
            .metadata
            .iter()
            .chain(
                self.seed_routes
                    .routes()
                    .filter_map(|r| r.metadata.as_ref()),
            )
            .chain(self.global.as_ref())
    }
}

fn seed_holds(seed: &SeedMatch, route: &SeedRoute) -> bool {
    match seed {
        SeedMatch::Route(r) => std::ptr::eq(*r, route),
        SeedMatch::Excluded(rs) => rs.iter().any(|r| std::ptr::eq(*r, route)),
        SeedMatch::None | SeedMatch::UnknownName => false,
    }
}

/// Key presence → the digest to look up. The plain key goes no further than this.
pub fn presented_key(key: &KeyPresence) -> Result<KeyHash, Refusal> {
    match key {
        KeyPresence::Missing => Err(Refusal::NoKey),
        KeyPresence::Duplicate => Err(Refusal::DuplicateKey),
        KeyPresence::Found(plain) => Ok(KeyHash::of(plain)),
    }
}

/// Consumer + request → the entry whose headers are sent: the 403 checks of SPEC §4 in order
/// (unknown route name, ACLs, entitlement), then the selection rules.
pub fn authorize<'a>(
    policy: &'a Policy,
    consumer: &'a Consumer,
    request: &AuthRequest,
    routes: &RouteMatch<'a>,
) -> Result<&'a Arc<Entry>, Refusal> {
    if matches!(routes.seed, SeedMatch::UnknownName) {
        return Err(Refusal::Forbidden(Forbidden::UnknownRoute));
    }
    if !policy.acl_permits(consumer, routes) {
        return Err(Refusal::Forbidden(Forbidden::Acl));
    }
    let list = policy
        .applicable_list(consumer, routes)
        .ok_or(Refusal::Forbidden(Forbidden::Entitlement))?;
    let pinned = routes.config.and_then(|r| r.metadata_id.as_deref());
    let chosen = match pinned.or(request.requested_id.as_deref()) {
        Some(id) => list.find(id),
        None => list.first(),
    };
    let entry = chosen.ok_or(Refusal::Forbidden(Forbidden::Entitlement))?;
    match first_missing(
        policy.required_capabilities(routes),
        &entry.fields.capabilities,
    ) {
        Some(index) => Err(Refusal::MissingCapability(
            policy.capability_names.name(index).to_owned(),
        )),
        None => Ok(entry),
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method, Uri};

    use super::*;
    use crate::core::model::tests::sample_fields;
    use crate::core::request::{ReadRules, read_auth};

    fn list(ids: &[&str]) -> Arc<MetadataList> {
        Arc::new(MetadataList::new(
            ids.iter()
                .map(|id| Arc::new(Entry::new(sample_fields(id)).unwrap()))
                .collect(),
        ))
    }

    fn consumer(groups: &[&str], own: Option<&[&str]>) -> Consumer {
        Consumer::new(
            "c".into(),
            None,
            groups.iter().map(|g| g.to_string()).collect(),
            own.map(list),
        )
        .unwrap()
    }

    fn paths(ps: &[&str]) -> Vec<(RoutePath, usize)> {
        ps.iter()
            .map(|p| (RoutePath::parse(p).unwrap(), p.len()))
            .collect()
    }

    fn allow(groups: &[&str]) -> Option<Acl> {
        Some(Acl {
            allow: groups.iter().map(|g| g.to_string()).collect(),
            deny: vec![],
        })
    }

    fn policy() -> Policy {
        let mut policy = Policy {
            global: Some(list(&["global-1"])),
            ..Policy::default()
        };
        let seed = &mut policy.seed_routes;
        seed.insert(
            SeedRoute {
                name: "gpt4o".into(),
                methods: vec!["POST".into()],
                acl: allow(&["openai-allowed"]),
                ..SeedRoute::default()
            },
            &paths(&["/gpt4o/chat"]),
        );
        seed.insert(
            SeedRoute {
                name: "api".into(),
                metadata: Some(list(&["route-1", "route-2"])),
                ..SeedRoute::default()
            },
            &paths(&["/api/user-metadata"]),
        );
        seed.insert(
            SeedRoute {
                name: "blocked".into(),
                acl: Some(Acl {
                    allow: vec![],
                    deny: vec!["banned".into()],
                }),
                ..SeedRoute::default()
            },
            &paths(&["/blocked/"]),
        );
        policy.config_routes.insert(
            ConfigRoute {
                prefix: "/gpt4o/".into(),
                metadata_id: Some("azure-gpt4o".into()),
                acl: Acl::default(),
                require_capabilities: vec![],
            },
            &paths(&["/gpt4o/"]),
        );
        policy.config_routes.insert(
            ConfigRoute {
                prefix: "/vip".into(),
                metadata_id: None,
                acl: allow(&["vip"]).unwrap_or_default(),
                require_capabilities: vec![],
            },
            &paths(&["/vip"]),
        );
        policy
    }

    fn chosen(
        policy: &Policy,
        consumer: &Consumer,
        path: &str,
        requested: Option<&str>,
    ) -> Result<String, Refusal> {
        let uri: Uri = "/auth".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-original-uri", path.parse().unwrap());
        headers.insert("x-original-method", "POST".parse().unwrap());
        if let Some(id) = requested {
            headers.insert("x-metadata-id", id.parse().unwrap());
        }
        let rules = ReadRules {
            header_selector: true,
            ..ReadRules::default()
        };
        let request = read_auth(&uri, &Method::GET, &headers, "/auth", &rules)?;
        let routes = policy.route_match(&request.original, None);
        authorize(policy, consumer, &request, &routes).map(|e| e.id.to_string())
    }

    const ACL: Refusal = Refusal::Forbidden(Forbidden::Acl);
    const ENTITLEMENT: Refusal = Refusal::Forbidden(Forbidden::Entitlement);

    #[test]
    fn config_pin_wins_over_request() {
        let p = policy();
        let admin = consumer(&["openai-allowed"], Some(&["kt-midm-base", "azure-gpt4o"]));
        assert_eq!(
            chosen(&p, &admin, "/gpt4o/chat", Some("kt-midm-base")),
            Ok("azure-gpt4o".into())
        );
    }

    #[test]
    fn requested_id_then_first_entry() {
        let p = policy();
        let admin = consumer(&[], Some(&["kt-midm-base", "azure-gpt4o"]));
        assert_eq!(
            chosen(&p, &admin, "/other", Some("azure-gpt4o")),
            Ok("azure-gpt4o".into())
        );
        assert_eq!(
            chosen(&p, &admin, "/other", None),
            Ok("kt-midm-base".into())
        );
        assert_eq!(chosen(&p, &admin, "/other", Some("nope")), Err(ENTITLEMENT));
    }

    #[test]
    fn kong_precedence_of_lists() {
        let p = policy();
        let bare = consumer(&[], None);
        assert_eq!(
            chosen(&p, &bare, "/api/user-metadata", None),
            Ok("route-1".into())
        );
        assert_eq!(
            chosen(&p, &bare, "/api/user-metadata", Some("route-2")),
            Ok("route-2".into())
        );
        assert_eq!(chosen(&p, &bare, "/elsewhere", None), Ok("global-1".into()));
        let own = consumer(&[], Some(&["mine"]));
        assert_eq!(
            chosen(&p, &own, "/api/user-metadata", None),
            Ok("mine".into())
        );
        // A consumer's own list is the applicable one even when the route's list has the id.
        assert_eq!(
            chosen(&p, &own, "/api/user-metadata", Some("route-1")),
            Err(ENTITLEMENT)
        );
    }

    #[test]
    fn no_list_at_all_is_forbidden() {
        let p = Policy::default();
        assert_eq!(
            chosen(&p, &consumer(&[], None), "/x", None),
            Err(ENTITLEMENT)
        );
    }

    #[test]
    fn both_acls_apply() {
        let p = policy();
        let user1 = consumer(&["midm-allowed"], Some(&["kt-midm-base"]));
        assert_eq!(chosen(&p, &user1, "/gpt4o/chat", None), Err(ACL));
        assert_eq!(chosen(&p, &user1, "/gpt4o/../gpt4o/%63hat", None), Err(ACL));
        assert_eq!(chosen(&p, &user1, "/GPT4O/chatter", None), Err(ACL));
        assert_eq!(chosen(&p, &user1, "/vip/x", None), Err(ACL));
        let vip = consumer(&["vip"], Some(&["a"]));
        assert_eq!(chosen(&p, &vip, "/vip/x", None), Ok("a".into()));
        let banned = consumer(&["banned"], Some(&["a"]));
        assert_eq!(chosen(&p, &banned, "/blocked/y", None), Err(ACL));
        assert_eq!(chosen(&p, &banned, "/blockedz", None), Ok("a".into()));
    }

    #[test]
    fn the_plain_reading_adds_its_route_acl() {
        let p = policy();
        let user1 = consumer(&["midm-allowed"], Some(&["kt-midm-base"]));
        // Normalized, this is /x; an upstream that does not remove dot segments reads /gpt4o/chat.
        assert_eq!(chosen(&p, &user1, "/gpt4o/chat/../../x", None), Err(ACL));
        assert_eq!(chosen(&p, &user1, "/vip/../x", None), Err(ACL));
    }

    #[test]
    fn global_plugins_cover_uris_without_a_route() {
        let mut p = policy();
        p.global_acl = allow(&["everyone"]);
        let user1 = consumer(&["midm-allowed"], Some(&["kt-midm-base"]));
        assert_eq!(chosen(&p, &user1, "/elsewhere", None), Err(ACL));
        let everyone = consumer(&["everyone"], Some(&["kt-midm-base"]));
        assert_eq!(
            chosen(&p, &everyone, "/elsewhere", None),
            Ok("kt-midm-base".into())
        );
    }

    #[test]
    fn both_route_sets_require_capabilities() {
        let mut p = policy();
        let mut seed_route = SeedRoute {
            name: "images".into(),
            require_capabilities: vec![2],
            ..SeedRoute::default()
        };
        p.seed_routes
            .insert(std::mem::take(&mut seed_route), &paths(&["/images"]));
        p.config_routes.insert(
            ConfigRoute {
                prefix: "/images/hd".into(),
                require_capabilities: vec![4],
                ..ConfigRoute::default()
            },
            &paths(&["/images/hd"]),
        );
        // sample entries have capabilities [1, 1, 0, 0, 0]
        let user = consumer(&[], Some(&["e"]));
        let missing = |name: &str| Refusal::MissingCapability(name.into());
        assert_eq!(
            chosen(&p, &user, "/images/x", None),
            Err(missing("image_generation"))
        );
        p.global_require_capabilities = vec![3];
        assert_eq!(chosen(&p, &user, "/nowhere", None), Err(missing("speech")));
        assert_eq!(
            chosen(&p, &user, "/api/user-metadata", None),
            Ok("e".into())
        );
        let mut fields = sample_fields("f");
        fields.capabilities = vec![1, 1, 1];
        let short = Consumer::new(
            "s".into(),
            None,
            vec![],
            Some(Arc::new(MetadataList::new(vec![Arc::new(
                Entry::new(fields).unwrap(),
            )]))),
        )
        .unwrap();
        assert_eq!(chosen(&p, &short, "/images/x", None), Ok("f".into()));
        // Past the end of a shorter array counts as 0; the seed route's requirement is checked first.
        assert_eq!(
            chosen(&p, &short, "/images/hd/1", None),
            Err(missing("premium"))
        );
    }

    #[test]
    fn presented_keys_become_digests() {
        assert_eq!(
            presented_key(&KeyPresence::Found("k".into())),
            Ok(KeyHash::of("k"))
        );
        assert_eq!(presented_key(&KeyPresence::Missing), Err(Refusal::NoKey));
        assert_eq!(
            presented_key(&KeyPresence::Duplicate),
            Err(Refusal::DuplicateKey)
        );
    }

    #[test]
    fn catalog_indexes_keys_names_and_every_list() {
        let c = Arc::new(consumer(&[], None));
        let catalog = Catalog::new(vec![(c.clone(), vec![KeyHash::of("k")])], policy());
        assert!(Arc::ptr_eq(&catalog.by_key[&KeyHash::of("k")], &c));
        assert!(Arc::ptr_eq(&catalog.by_name["c"], &c));
        assert_eq!(catalog.entry_count(), 3);
        assert!(catalog.has_entry("route-2"));
        assert!(!catalog.has_entry("azure-gpt4o"));
    }
}
