//! Request routing and the endpoints: `/auth`, `/api/user-metadata`, `/api/tdl-matrix`, health,
//! readiness and metrics.
//!
//! Only the request head is used; no body is ever read (nginx may announce one and send nothing).
//! A decision awaits nothing on the hot path: the key is usually answered from the in-process cache,
//! and only `sync` counting waits for Redis (bounded by the command timeout).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::answer::{self, Body};
use crate::core::decide::{Catalog, RouteMatch, acl_permits};
use crate::core::format::write_ascii_json_string;
use crate::core::request::{AuthQuery, parse_api, parse_auth};
use crate::core::{Consumer, Deny, authorize, presented_key};
use crate::lookup::{Resolution, Resolver};
use crate::metrics::{Endpoint, Metrics, Outcome};
use crate::service::Readiness;
use crate::store::RedisStore;
use crate::tdl::TdlCounters;

const API_METHODS: &str = "GET, POST, OPTIONS";
const PROBE_METHODS: &str = "GET, HEAD";

/// Everything a request can reach.
pub struct App {
    pub catalog: ArcSwap<Catalog>,
    pub resolver: Resolver,
    pub counters: Arc<TdlCounters>,
    pub store: Option<Arc<RedisStore>>,
    pub metrics: Metrics,
    pub timezone_name: String,
    /// Longest time a `sync` call waits for its increment to reach Redis.
    pub sync_wait: Duration,
    /// The `/readyz` latch: seed copies written, not shutting down (see [`Readiness`]).
    pub ready: Arc<Readiness>,
}

impl App {
    /// Answers one request from its head.
    pub async fn respond(&self, request: &Parts) -> Response<Body> {
        let started = Instant::now();
        let path = request.uri.path();
        let (endpoint, outcome, response) = if path == "/auth" || path.starts_with("/auth/") {
            let (outcome, response) = self.auth(request).await;
            (Endpoint::Auth, outcome, response)
        } else {
            match path {
                "/api/user-metadata" => self.api(request, Endpoint::UserMetadata).await,
                "/api/tdl-matrix" => self.api(request, Endpoint::TdlMatrix).await,
                "/healthz" => probe(request, || {
                    answer::json(StatusCode::OK, &br#"{"status":"ok"}"#[..])
                }),
                "/readyz" => probe(request, || self.readiness()),
                "/metrics" => probe(request, || {
                    answer::text(
                        StatusCode::OK,
                        "text/plain; version=0.0.4",
                        self.metrics.render(),
                    )
                }),
                _ => (Endpoint::Other, Outcome::Served, answer::not_found()),
            }
        };
        self.metrics.observe(endpoint, outcome, started.elapsed());
        response
    }

    /// The consumer a request's key belongs to, or why there is none.
    async fn consumer<'c>(
        &self,
        catalog: &'c Catalog,
        query: &AuthQuery<'_>,
    ) -> Result<Cow<'c, Arc<Consumer>>, Deny> {
        let key = presented_key(&query.key)?;
        match self.resolver.resolve(catalog, key).await {
            Resolution::Consumer(consumer) => Ok(consumer),
            Resolution::Unknown => Err(Deny::InvalidKey),
            Resolution::Unavailable => Err(Deny::Unavailable),
        }
    }

    async fn auth(&self, request: &Parts) -> (Outcome, Response<Body>) {
        let query = parse_auth(&request.uri, &request.method, &request.headers);
        // A guard, not a clone: bumping the shared reference count on every request would bounce
        // its cache line between the worker threads.
        let catalog = self.catalog.load();
        let consumer = match self.consumer(&catalog, &query).await {
            Ok(consumer) => consumer,
            Err(reason) => return denied(reason, &query),
        };
        let entry = match authorize(&catalog.policy, &consumer, &query) {
            Ok(entry) => entry,
            Err(reason) => return denied(reason, &query),
        };
        if let Some(stored) = self.counters.record(&consumer.username, &entry.id) {
            // Sync mode: answer once Redis has the increment, or when it cannot have it soon
            // (then it stays buffered and the call is still allowed).
            let _ = tokio::time::timeout(self.sync_wait, stored).await;
        }
        tracing::debug!(consumer = %consumer.username, entry = %entry.id, path = %query.original.path, "allow");
        (Outcome::Allow, answer::allow(&consumer, entry))
    }

    async fn api(
        &self,
        request: &Parts,
        endpoint: Endpoint,
    ) -> (Endpoint, Outcome, Response<Body>) {
        match request.method {
            Method::GET | Method::POST | Method::HEAD => {}
            Method::OPTIONS => return (endpoint, Outcome::Served, answer::options(API_METHODS)),
            _ => {
                return (
                    endpoint,
                    Outcome::Served,
                    answer::method_not_allowed(API_METHODS),
                );
            }
        }
        let query = parse_api(&request.uri, &request.method, &request.headers);
        let catalog = self.catalog.load_full();
        let denied = |reason| (endpoint, Outcome::Denied(reason), answer::deny(reason));
        let consumer = match self.consumer(&catalog, &query).await {
            Ok(consumer) => consumer,
            Err(reason) => return denied(reason),
        };
        let routes = catalog.policy.route_match(&query.original);
        if !acl_permits(&consumer, &routes) {
            return denied(Deny::Forbidden);
        }
        let body = match endpoint {
            Endpoint::TdlMatrix => match self.tdl_matrix_json(&catalog, &consumer, &routes).await {
                Some(body) => body,
                None => return denied(Deny::Unavailable),
            },
            _ => catalog
                .policy
                .applicable_list(&consumer, &routes)
                .map_or_else(|| "[]".to_owned(), |l| l.json()),
        };
        (endpoint, Outcome::Allow, answer::json(StatusCode::OK, body))
    }

    /// Today's usage for the consumer: the applicable list's entries, then any other entry used
    /// today (sorted by id). Always an answer: while Redis cannot be read the counts are the last
    /// ones read plus this process's increments since, marked `"complete":false` (SPEC §7).
    async fn tdl_matrix_json(
        &self,
        catalog: &Catalog,
        consumer: &Consumer,
        routes: &RouteMatch<'_>,
    ) -> Option<String> {
        let stamp = self.counters.now();
        let applicable = catalog.policy.applicable_list(consumer, routes);
        let known: Vec<&str> = applicable
            .map(|l| l.entries().iter().map(|e| &*e.id).collect())
            .unwrap_or_default();
        let mut usage = self
            .counters
            .usage(&consumer.username, stamp.date, &known)
            .await;
        if let Some(others) = usage.entries.get_mut(known.len()..) {
            others.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let lists = catalog.policy.lists_in_precedence(consumer, routes);
        let mut out = String::from("{\"timezone\":");
        write_ascii_json_string(&mut out, &self.timezone_name);
        let _ = write!(
            out,
            ",\"date\":\"{}\",\"slot\":\"T{}\",\"complete\":{},\"entries\":[",
            stamp.date, stamp.slot, usage.complete
        );
        for (i, (id, counts)) in usage.entries.iter().enumerate() {
            let entry = lists.iter().find_map(|l| l.find(id));
            out.push_str(if i > 0 { ",{\"id\":" } else { "{\"id\":" });
            write_ascii_json_string(&mut out, id);
            out.push_str(",\"provider_name\":");
            write_ascii_json_string(&mut out, entry.map_or("", |e| &e.fields.provider_name));
            out.push_str(",\"tdl_matrix\":");
            out.push_str(entry.map_or("null", |e| e.tdl_matrix_json()));
            out.push_str(",\"usage\":{");
            for (slot, n) in counts.iter().enumerate() {
                let _ = write!(
                    out,
                    "{}\"T{}\":{n}",
                    if slot > 0 { "," } else { "" },
                    slot + 1
                );
            }
            out.push_str("}}");
        }
        out.push_str("]}");
        Some(out)
    }

    /// `/readyz`: 503 until the latch is released. With Redis configured, `redis.seed_copies` says
    /// whether the seed's copies have been written yet.
    fn readiness(&self) -> Response<Body> {
        let store = self.store.as_deref();
        let state = self.ready.state(store);
        let mut body = format!(
            "{{\"ready\":{},\"redis\":{{\"configured\":{},\"connected\":{}",
            state.ready,
            store.is_some(),
            store.is_some_and(|s| s.is_up())
        );
        if store.is_some() {
            let copies = if state.seed_copies_written {
                "written"
            } else {
                "pending"
            };
            let _ = write!(body, ",\"seed_copies\":\"{copies}\"");
        }
        body.push_str("}}");
        let status = if state.ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        answer::json(status, body)
    }
}

fn denied(reason: Deny, query: &AuthQuery) -> (Outcome, Response<Body>) {
    tracing::debug!(?reason, path = %query.original.path, "deny");
    (Outcome::Denied(reason), answer::deny(reason))
}

fn probe(
    request: &Parts,
    answer: impl FnOnce() -> Response<Body>,
) -> (Endpoint, Outcome, Response<Body>) {
    let response = match request.method {
        Method::GET | Method::HEAD => answer(),
        _ => answer::method_not_allowed(PROBE_METHODS),
    };
    (Endpoint::Other, Outcome::Served, response)
}
