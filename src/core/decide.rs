//! The decision: key → consumer → applicable list → entry, or the reason to refuse.
//!
//! Pure functions over a loaded [`Catalog`]: no I/O, no clock, no allocation on the allow path beyond
//! what request parsing did. The HTTP adapter turns the result into an answer; the counters adapter
//! counts it.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use super::key::KeyHash;
use super::model::{Consumer, Entry, MetadataList};
use super::request::{AuthQuery, KeyPresence, OriginalRequest};
use super::routes::{ConfigRoute, RouteTable, SeedRoute};

/// Why a request is refused (SPEC §4 answer table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    NoKey,
    InvalidKey,
    DuplicateKey,
    Forbidden,
    /// The key is in no local source and the metadata store cannot be asked.
    Unavailable,
}

/// The routes and default lists that apply to every consumer.
#[derive(Debug, Default)]
pub struct Policy {
    pub seed_routes: RouteTable<SeedRoute>,
    pub config_routes: RouteTable<ConfigRoute>,
    /// The global `user-metadata` plugin's list.
    pub global: Option<Arc<MetadataList>>,
}

/// Everything loaded from the seed and config: consumers by key digest, and the policy.
#[derive(Debug, Default)]
pub struct Catalog {
    pub consumers: Vec<Arc<Consumer>>,
    pub by_key: HashMap<KeyHash, Arc<Consumer>>,
    pub by_name: HashMap<Arc<str>, Arc<Consumer>>,
    pub policy: Policy,
}

impl Catalog {
    /// Indexes consumers by key digest and routes by prefix. Seed and config are already validated.
    pub fn new(
        consumers: Vec<(Arc<Consumer>, Vec<KeyHash>)>,
        seed_routes: Vec<(SeedRoute, Vec<String>)>,
        config_routes: Vec<ConfigRoute>,
        global: Option<Arc<MetadataList>>,
    ) -> Catalog {
        let mut catalog = Catalog {
            policy: Policy {
                global,
                ..Policy::default()
            },
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
        for (route, prefixes) in seed_routes {
            catalog.policy.seed_routes.insert(route, &prefixes);
        }
        for route in config_routes {
            let prefix = vec![route.prefix.clone()];
            catalog.policy.config_routes.insert(route, &prefix);
        }
        catalog
    }

    pub fn entry_count(&self) -> usize {
        let mut lists: Vec<&Arc<MetadataList>> = self
            .consumers
            .iter()
            .filter_map(|c| c.metadata.as_ref())
            .collect();
        lists.extend(self.policy.global.as_ref());
        lists.iter().map(|l| l.entries().len()).sum()
    }
}

/// What the request's routes say about it.
pub struct RouteMatch<'p> {
    pub seed: Option<&'p SeedRoute>,
    pub config: Option<&'p ConfigRoute>,
}

impl Policy {
    pub fn route_match(&self, original: &OriginalRequest) -> RouteMatch<'_> {
        RouteMatch {
            seed: self.seed_routes.find(&original.path, original.method),
            config: self.config_routes.find(&original.path, original.method),
        }
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
            .or_else(|| routes.seed.and_then(|r| r.metadata.as_ref()))
            .or(self.global.as_ref())
    }

    /// Every list that could describe an entry for this consumer, in Kong precedence.
    pub fn lists_in_precedence<'a>(
        &'a self,
        consumer: &'a Consumer,
        routes: &RouteMatch<'a>,
    ) -> Vec<&'a Arc<MetadataList>> {
        let mut lists: Vec<&Arc<MetadataList>> = Vec::with_capacity(3);
        lists.extend(consumer.metadata.as_ref());
        lists.extend(routes.seed.and_then(|r| r.metadata.as_ref()));
        lists.extend(self.global.as_ref());
        lists
    }
}

/// Whether both matched routes' ACLs let the consumer through.
pub fn acl_permits(consumer: &Consumer, routes: &RouteMatch) -> bool {
    routes.seed.is_none_or(|r| r.acl.permits(consumer))
        && routes.config.is_none_or(|r| r.acl.permits(consumer))
}

/// Key presence → the digest to look up. The plain key goes no further than this.
pub fn presented_key(key: &KeyPresence) -> Result<KeyHash, Deny> {
    match key {
        KeyPresence::Missing => Err(Deny::NoKey),
        KeyPresence::Duplicate => Err(Deny::DuplicateKey),
        KeyPresence::Found(plain) => Ok(KeyHash::of(plain)),
    }
}

/// Consumer + request → the entry whose headers are sent, per the selection rules of SPEC §4.
pub fn authorize<'a>(
    policy: &'a Policy,
    consumer: &'a Consumer,
    query: &AuthQuery,
) -> Result<&'a Arc<Entry>, Deny> {
    let routes = policy.route_match(&query.original);
    if !acl_permits(consumer, &routes) {
        return Err(Deny::Forbidden);
    }
    let list = policy
        .applicable_list(consumer, &routes)
        .ok_or(Deny::Forbidden)?;
    let pinned = routes.config.and_then(|r| r.metadata_id.as_deref());
    let chosen = match pinned.or(query.requested_id.as_deref()) {
        Some(id) => list.find(id),
        None => list.first(),
    };
    chosen.ok_or(Deny::Forbidden)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::core::model::tests::sample_fields;
    use crate::core::path::normalize;
    use crate::core::routes::Acl;

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

    fn policy() -> Policy {
        let mut policy = Policy {
            global: Some(list(&["global-1"])),
            ..Policy::default()
        };
        policy.seed_routes.insert(
            SeedRoute {
                name: "gpt4o".into(),
                methods: vec!["POST".into()],
                acl: Acl {
                    allow: vec!["openai-allowed".into()],
                    deny: vec![],
                },
                metadata: None,
            },
            &["/gpt4o/chat".into()],
        );
        policy.seed_routes.insert(
            SeedRoute {
                name: "api".into(),
                metadata: Some(list(&["route-1", "route-2"])),
                ..SeedRoute::default()
            },
            &["/api/user-metadata".into()],
        );
        policy.seed_routes.insert(
            SeedRoute {
                name: "blocked".into(),
                acl: Acl {
                    allow: vec![],
                    deny: vec!["banned".into()],
                },
                ..SeedRoute::default()
            },
            &["/blocked".into()],
        );
        policy.config_routes.insert(
            ConfigRoute {
                prefix: "/gpt4o/".into(),
                metadata_id: Some("azure-gpt4o".into()),
                acl: Acl::default(),
            },
            &["/gpt4o/".into()],
        );
        policy.config_routes.insert(
            ConfigRoute {
                prefix: "/vip".into(),
                metadata_id: None,
                acl: Acl {
                    allow: vec!["vip".into()],
                    deny: vec![],
                },
            },
            &["/vip".into()],
        );
        policy
    }

    fn query<'a>(path: &'a str, requested: Option<&'a str>) -> AuthQuery<'a> {
        AuthQuery {
            original: OriginalRequest {
                path: normalize(path),
                query: None,
                method: "POST",
            },
            key: KeyPresence::Missing,
            requested_id: requested.map(Cow::Borrowed),
        }
    }

    fn chosen(
        policy: &Policy,
        consumer: &Consumer,
        path: &str,
        requested: Option<&str>,
    ) -> Result<String, Deny> {
        authorize(policy, consumer, &query(path, requested)).map(|e| e.id.to_string())
    }

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
        assert_eq!(
            chosen(&p, &admin, "/other", Some("nope")),
            Err(Deny::Forbidden)
        );
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
            Err(Deny::Forbidden)
        );
    }

    #[test]
    fn no_list_at_all_is_forbidden() {
        let p = Policy::default();
        assert_eq!(
            chosen(&p, &consumer(&[], None), "/x", None),
            Err(Deny::Forbidden)
        );
    }

    #[test]
    fn both_acls_apply() {
        let p = policy();
        let user1 = consumer(&["midm-allowed"], Some(&["kt-midm-base"]));
        assert_eq!(
            chosen(&p, &user1, "/gpt4o/chat", None),
            Err(Deny::Forbidden)
        );
        assert_eq!(
            chosen(&p, &user1, "/gpt4o/../gpt4o/%63hat", None),
            Err(Deny::Forbidden)
        );
        assert_eq!(chosen(&p, &user1, "/vip/x", None), Err(Deny::Forbidden));
        let vip = consumer(&["vip"], Some(&["a"]));
        assert_eq!(chosen(&p, &vip, "/vip/x", None), Ok("a".into()));
        let banned = consumer(&["banned"], Some(&["a"]));
        assert_eq!(
            chosen(&p, &banned, "/blocked/y", None),
            Err(Deny::Forbidden)
        );
        assert_eq!(chosen(&p, &banned, "/blockedz", None), Ok("a".into()));
    }

    #[test]
    fn presented_keys_become_digests() {
        assert_eq!(
            presented_key(&KeyPresence::Found("k".into())),
            Ok(KeyHash::of("k"))
        );
        assert_eq!(presented_key(&KeyPresence::Missing), Err(Deny::NoKey));
        assert_eq!(
            presented_key(&KeyPresence::Duplicate),
            Err(Deny::DuplicateKey)
        );
    }

    #[test]
    fn catalog_indexes_keys_and_names() {
        let c = Arc::new(consumer(&[], None));
        let catalog = Catalog::new(
            vec![(c.clone(), vec![KeyHash::of("k")])],
            vec![],
            vec![],
            None,
        );
        assert!(Arc::ptr_eq(&catalog.by_key[&KeyHash::of("k")], &c));
        assert!(Arc::ptr_eq(&catalog.by_name["c"], &c));
    }
}
