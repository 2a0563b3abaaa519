//! Property tests of the decision core's input handling (SPEC §4, §5): path normalization is
//! idempotent, canonical, and never makes an ACL apply to fewer paths than a plain reading of the
//! same bytes; reading a request head never panics, whatever its header bytes.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use user_metadata_auth::core::decimal::Decimal;
use user_metadata_auth::core::model::{EntryFields, SLOTS};
use user_metadata_auth::core::path::normalize;
use user_metadata_auth::core::request::{ReadRules, read_auth};
use user_metadata_auth::core::routes::{Acl, RoutePath, SeedRoute};
use user_metadata_auth::core::{Consumer, Entry, MetadataList, Policy, authorize};

/// Paths built from the characters that matter to normalization.
fn raw_path() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop::sample::select(vec![
        "/", "a", "b", "A", ".", "..", "%2e", "%2E", "%2f", "%5c", "%3b", "%41", "%", ";", ";x",
        "\\", "//", "é", "\u{ff}",
    ]);
    prop::collection::vec(pieces, 0..12).prop_map(|parts| parts.concat().into_bytes())
}

const PREFIXES: [&str; 5] = ["/a", "/a/b", "/ab/", "/b;", "/a/.."];

fn policy() -> Policy {
    let routes = PREFIXES
        .iter()
        .enumerate()
        .map(|(i, prefix)| {
            let route = SeedRoute {
                name: format!("r{i}"),
                acl: Some(Acl {
                    allow: vec![format!("group-{i}")],
                    deny: vec![],
                }),
                ..SeedRoute::default()
            };
            (
                route,
                vec![(RoutePath::parse(prefix).unwrap(), prefix.len())],
            )
        })
        .collect();
    Policy {
        global: Some(Arc::new(MetadataList::new(vec![Arc::new(
            Entry::new(fields()).unwrap(),
        )]))),
        ..Policy::build(routes, Vec::new())
    }
}

fn fields() -> EntryFields {
    EntryFields {
        id: "e".into(),
        provider_name: "p".into(),
        tags: vec![],
        tdl_matrix: std::array::from_fn::<_, SLOTS, _>(|_| vec![Decimal::ZERO]),
        capabilities: vec![1],
        max_input_tokens: 1,
        max_output_tokens: 1,
        input_cost_per_token: Decimal::ZERO,
        output_cost_per_token: Decimal::ZERO,
        limits: None,
        models: None,
        cache_read_input_token_cost: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn normalization_is_idempotent_and_canonical(raw in raw_path()) {
        let once = normalize(&raw);
        prop_assert_eq!(normalize(once.as_bytes()), once.clone());
        prop_assert!(once.starts_with('/'));
        prop_assert!(once.bytes().all(|b| b.is_ascii_graphic()), "{}", once);
        prop_assert!(!once.contains("//") && !once.contains('\\') && !once.contains(';'), "{}", once);
        for segment in once.split('/') {
            prop_assert!(segment != "." && segment != "..", "{}", once);
        }
    }

    /// Whatever route a plain, case-insensitive prefix reading of the raw bytes falls under, its
    /// ACL applies: a consumer in no group is refused.
    #[test]
    fn never_fewer_acls_than_a_plain_reading(raw in raw_path()) {
        let policy = policy();
        let written = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        let plain_hit = PREFIXES.iter().any(|p| written.starts_with(&p.to_ascii_lowercase()));
        let mut headers = HeaderMap::new();
        let Ok(value) = HeaderValue::from_bytes(&raw) else { return Ok(()) };
        headers.insert("x-original-uri", value);
        let uri: Uri = "/auth".parse().unwrap();
        let rules = ReadRules::default();
        let Ok(request) = read_auth(&uri, &Method::GET, &headers, "/auth", &rules) else {
            // Refused as unreadable: no decision was made on it at all.
            return Ok(());
        };
        let routes = policy.route_match(&request.original, None);
        let nobody = Consumer::new("nobody".into(), None, vec![], None).unwrap();
        let decision = authorize(&policy, &nobody, &request, &routes);
        if plain_hit {
            prop_assert!(decision.is_err(), "{:?} read as {:?}", written, request.original.path);
        }
    }

    /// Any header bytes: the head is read or refused with a 400, never a panic.
    #[test]
    fn reading_a_head_never_panics(
        pairs in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "apikey", "x-api-key", "authorization", "x-forwarded-uri", "x-original-uri",
                    "x-forwarded-method", "x-original-method", "x-forwarded-host", "x-original-host",
                    "host", "x-metadata-id", "x-uma-route", "x-uma-gateway",
                ]),
                prop::collection::vec(any::<u8>(), 0..40),
            ),
            0..8,
        ),
        path in "/auth(/[a-z%.;?=&]{0,12}){0,3}",
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in &pairs {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(HeaderName::from_static(name), value);
            }
        }
        let Ok(uri) = path.parse::<Uri>() else { return Ok(()) };
        let rules = ReadRules { query_selector: true, header_selector: true, trust_route_header: true, ..ReadRules::default() };
        match read_auth(&uri, &Method::POST, &headers, "/auth", &rules) {
            Ok(request) => {
                let policy = policy();
                let routes = policy.route_match(&request.original, request.route_name);
                let _ = request.key(&policy.key_auths(&routes));
            }
            Err(refusal) => prop_assert_eq!(refusal.status(), 400, "{:?}", refusal),
        }
    }
}
