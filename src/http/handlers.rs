//! Request routing and the endpoints: `/auth`, `/auth-body`, `/api/user-metadata`,
//! `/api/tdl-matrix`, health, readiness and metrics (`/usage` and `/api/usage` in
//! [`super::usage`]).
//!
//! Only `/auth-body` reads a body (SPEC §8.3, through [`super::body`]); everywhere else only the
//! request head is used (nginx may announce a body and send nothing). `/auth` and `/auth-body` run
//! the same head-level checks and the same counting; the body checks sit between them (SPEC §4
//! step 6).
//! A decision awaits nothing on the hot path: the key is usually answered from the in-process cache,
//! and only `sync` counting waits for Redis (bounded by the command timeout). Each endpoint returns
//! `Result<Response, Refusal>`; [`answer::refuse`] is the one place a refusal becomes an answer.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;

use super::answer::{self, Body};
use super::body::BodyReader;
use subtle::ConstantTimeEq;

use crate::core::decide::{Catalog, RouteMatch};
use crate::core::format::write_ascii_json_string;
use crate::core::limits::Limits;
use crate::core::request::{AuthRequest, KeyPresence, ReadRules, read_api, read_auth};
use crate::core::{
    Consumer, Entry, Forbidden, RateLimitFields, RateLimitedBy, Refusal, authorize, presented_key,
};
use crate::lookup::{Resolution, Resolver};
use crate::metrics::{Endpoint, Metrics, Outcome};
use crate::quota::Quotas;
use crate::service::Readiness;
use crate::store::RedisStore;
use crate::tdl::TdlCounters;
use crate::usage::UsageBook;

const API_METHODS: &str = "GET, POST, OPTIONS";
/// The input tokens `/auth-body` counted, on its 200.
const INPUT_TOKENS: HeaderName = HeaderName::from_static("x-user-input-tokens");
const PROBE_METHODS: &str = "GET, HEAD";

/// Everything a request can reach.
pub struct App {
    pub catalog: ArcSwap<Catalog>,
    pub resolver: Resolver,
    pub counters: Arc<TdlCounters>,
    /// Request limits (SPEC §8.1).
    pub quotas: Arc<Quotas>,
    pub store: Option<Arc<RedisStore>>,
    pub metrics: Metrics,
    /// How `/auth` requests are read (`[auth]`).
    pub rules: ReadRules,
    /// `auth.gateway_secret`: `/auth` needs `X-Uma-Gateway` with it.
    pub gateway_secret: Option<Box<[u8]>>,
    pub timezone_name: String,
    /// Longest time a `sync` call waits for its increment to reach Redis.
    pub sync_wait: Duration,
    /// The `/readyz` latch: seed copies written, not shutting down (see [`Readiness`]).
    pub ready: Arc<Readiness>,
    /// `/auth-body`'s body bounds and budget (`[auth]`).
    pub body: BodyReader,
    /// Usage records and the token and cost budgets (SPEC §9, §8.1).
    pub usage: Arc<UsageBook>,
    /// `usage.token`: `POST /usage` needs it as a bearer token; `None` turns the endpoint off.
    pub usage_token: Option<Box<[u8]>>,
    /// `usage.max_body_bytes`.
    pub usage_max_body: u64,
}

impl App {
    /// Answers one request; only `/auth-body` reads `body`.
    pub async fn respond(&self, request: &Parts, body: Incoming) -> Response<Body> {
        let started = Instant::now();
        let path = request.uri.path();
        let (endpoint, outcome, response) = if under(path, "/auth") {
            let (outcome, response) = answered(self.auth(request).await);
            (Endpoint::Auth, outcome, response)
        } else if under(path, "/auth-body") {
            let (outcome, response) = answered(self.auth_body(request, body).await);
            (Endpoint::AuthBody, outcome, response)
        } else {
            match path {
                "/api/user-metadata" => self.api(request, Endpoint::UserMetadata).await,
                "/api/tdl-matrix" => self.api(request, Endpoint::TdlMatrix).await,
                "/api/usage" => self.api(request, Endpoint::ApiUsage).await,
                "/usage" if request.method == Method::POST => {
                    let (outcome, response) = answered(self.ingest(request, body).await);
                    (Endpoint::Usage, outcome, response)
                }
                "/usage" => (
                    Endpoint::Usage,
                    Outcome::Served,
                    answer::method_not_allowed("POST"),
                ),
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
        key: &KeyPresence<'_>,
    ) -> Result<Cow<'c, Arc<Consumer>>, Refusal> {
        let key = presented_key(key)?;
        match self.resolver.resolve(catalog, key).await {
            Resolution::Consumer(consumer) => Ok(consumer),
            Resolution::Unknown => Err(Refusal::InvalidKey),
            Resolution::Unavailable => Err(Refusal::Unavailable),
        }
    }

    /// `/auth`: the checks of SPEC §4 in their order, then the count.
    async fn auth(&self, parts: &Parts) -> Result<Response<Body>, Refusal> {
        let request = self.read(parts, "/auth")?;
        // A guard, not a clone: bumping the shared reference count on every request would bounce
        // its cache line between the worker threads.
        let catalog = self.catalog.load();
        let routes = catalog
            .policy
            .route_match(&request.original, request.route_name);
        let key = request.key(&catalog.policy.key_auths(&routes));
        let consumer = self.consumer(&catalog, &key).await?;
        let entry = authorize(&catalog.policy, &consumer, &request, &routes)?;
        self.allow(&consumer, entry, &request).await
    }

    /// `/auth-body` (SPEC §8.3): `/auth`'s checks (the same lines: `/auth` keeps borrowing where
    /// this one must own), the body's at step 6, then the same count.
    async fn auth_body(&self, parts: &Parts, body: Incoming) -> Result<Response<Body>, Refusal> {
        let request = self.read(parts, "/auth-body")?;
        // Owned, so that no catalog guard is held while the body arrives.
        let (consumer, entry) = {
            let catalog = self.catalog.load();
            let routes = catalog
                .policy
                .route_match(&request.original, request.route_name);
            let key = request.key(&catalog.policy.key_auths(&routes));
            let consumer = self.consumer(&catalog, &key).await?;
            let entry = authorize(&catalog.policy, &consumer, &request, &routes)?.clone();
            (Arc::clone(&consumer), entry)
        };
        let tokens = self.body.check(&parts.headers, body, &entry).await?;
        let mut response = self.allow(&consumer, &entry, &request).await?;
        response
            .headers_mut()
            .insert(INPUT_TOKENS, HeaderValue::from(tokens));
        Ok(response)
    }

    /// SPEC §4 step 1: the request as read from `endpoint`'s shape, from a known gateway.
    fn read<'p>(&self, parts: &'p Parts, endpoint: &str) -> Result<AuthRequest<'p>, Refusal> {
        let request = read_auth(
            &parts.uri,
            &parts.method,
            &parts.headers,
            endpoint,
            &self.rules,
        )?;
        self.check_gateway(&request)?;
        Ok(request)
    }

    /// SPEC §4 steps 7-9: the quota, the count, the allow answer.
    async fn allow(
        &self,
        consumer: &Consumer,
        entry: &Arc<Entry>,
        request: &AuthRequest<'_>,
    ) -> Result<Response<Body>, Refusal> {
        // The last check (SPEC §4 steps 7-8): only a call that is allowed takes quota.
        let rate_limit = match &entry.fields.limits {
            Some(limits) => Some(self.limits(consumer, entry, limits).await?),
            None => None,
        };
        if let Some(stored) = self.counters.record(&consumer.username, &entry.id) {
            // Sync mode: answer once Redis has the increment, or when it cannot have it soon
            // (then it stays buffered and the call is still allowed).
            let _ = tokio::time::timeout(self.sync_wait, stored).await;
        }
        tracing::debug!(consumer = %consumer.username, entry = %entry.id, path = %request.original.path, "allow");
        let mut response = answer::allow(consumer, entry);
        if let Some(fields) = rate_limit {
            answer::rate_limit_fields(&mut response, fields);
        }
        Ok(response)
    }

    /// SPEC §8.1: budgets first (reading them takes nothing), then the request quota, so a call a
    /// budget refuses takes no quota. Either 429 lists every configured limit.
    async fn limits(
        &self,
        consumer: &Consumer,
        entry: &Arc<Entry>,
        limits: &Limits,
    ) -> Result<RateLimitFields, Refusal> {
        let now = self.usage.now();
        let budgets = if limits.has_budgets() {
            self.usage
                .budgets(&consumer.username, &entry.id, limits, now)
                .await?
        } else {
            Vec::new()
        };
        if budgets.iter().any(|s| s.refused) {
            let mut standings = self.quotas.peek(&consumer.username, &entry.id, limits);
            // A request window that is used up too is what the caller hears about first: its
            // message, and `Retry-After` the latest end among everything that refuses.
            let requests_refuse = standings.iter().any(|s| s.refused);
            standings.extend(budgets);
            let by = Box::new(RateLimitedBy::of(&standings, now));
            return Err(if requests_refuse {
                Refusal::RateLimited(by)
            } else {
                Refusal::BudgetExceeded(by)
            });
        }
        if !limits.has_request_limits() {
            return Ok(RateLimitFields::of(&budgets, now));
        }
        match self
            .quotas
            .take(&consumer.username, &entry.id, limits)
            .await
        {
            Ok(mut standings) => {
                standings.extend(budgets);
                Ok(RateLimitFields::of(&standings, now))
            }
            Err(Refusal::RateLimited(mut by)) => {
                by.fields = by.fields.extended(&budgets, now);
                Err(Refusal::RateLimited(by))
            }
            Err(other) => Err(other),
        }
    }

    /// `auth.gateway_secret`: compared in constant time, so timing tells nothing about it.
    fn check_gateway(&self, request: &AuthRequest) -> Result<(), Refusal> {
        let Some(secret) = &self.gateway_secret else {
            return Ok(());
        };
        let given = request.gateway_token.unwrap_or_default();
        if bool::from(given.ct_eq(secret)) {
            Ok(())
        } else {
            Err(Refusal::UnknownGateway)
        }
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
        let (outcome, response) = answered(self.api_answer(request, endpoint).await);
        (endpoint, outcome, response)
    }

    /// `/api/user-metadata` and `/api/tdl-matrix`: the request itself is the original one, so a
    /// route on these paths applies its ACL and list as in the seed document.
    async fn api_answer(
        &self,
        parts: &Parts,
        endpoint: Endpoint,
    ) -> Result<Response<Body>, Refusal> {
        let request = read_api(&parts.uri, &parts.method, &parts.headers)?;
        let catalog = self.catalog.load_full();
        let routes = catalog.policy.route_match(&request.original, None);
        let key = request.key(&catalog.policy.key_auths(&routes));
        let consumer = self.consumer(&catalog, &key).await?;
        if !catalog.policy.acl_permits(&consumer, &routes) {
            return Err(Refusal::Forbidden(Forbidden::Acl));
        }
        let body = match endpoint {
            Endpoint::TdlMatrix => self.tdl_matrix_json(&catalog, &consumer, &routes).await,
            Endpoint::ApiUsage => self.usage_json(&catalog, &consumer, &routes, parts).await?,
            _ => catalog
                .policy
                .applicable_list(&consumer, &routes)
                .map_or_else(|| "[]".to_owned(), |l| l.json()),
        };
        Ok(answer::json(StatusCode::OK, body))
    }

    /// Today's usage for the consumer: the applicable list's entries, then any other entry used
    /// today (sorted by id). Always an answer: while Redis cannot be read the counts are the last
    /// ones read plus this process's increments since, marked `"complete":false` (SPEC §7).
    async fn tdl_matrix_json(
        &self,
        catalog: &Catalog,
        consumer: &Consumer,
        routes: &RouteMatch<'_>,
    ) -> String {
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
        let lists: Vec<_> = catalog.policy.describing_lists(consumer).collect();
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
        out
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
            // Whether admin changes made on other replicas reach this one at once (SPEC §10).
            let subscribed = store.is_some_and(RedisStore::subscribed);
            let _ = write!(body, ",\"invalidation\":{{\"subscribed\":{subscribed}}}");
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

/// `endpoint` itself or a path below it (`/auth/...`, not `/authx`).
fn under(path: &str, endpoint: &str) -> bool {
    path.strip_prefix(endpoint)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A decision's result as its metrics outcome and its answer.
fn answered(result: Result<Response<Body>, Refusal>) -> (Outcome, Response<Body>) {
    match result {
        Ok(response) => (Outcome::Allow, response),
        Err(refusal) => {
            tracing::debug!(?refusal, "refused");
            (Outcome::refused(&refusal), answer::refuse(&refusal))
        }
    }
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
