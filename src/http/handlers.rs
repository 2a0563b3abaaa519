//! Request routing and the endpoints: `/auth`, `/api/user-metadata`, `/api/tdl-matrix`, health,
//! readiness and metrics.
//!
//! Handlers are synchronous: the decision needs no I/O in embedded mode, so a request is answered in
//! the task that read its head, and no body is ever read (nginx may announce one and send nothing).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::answer::{self, Body};
use crate::core::decide::{Catalog, acl_permits};
use crate::core::format::write_ascii_json_string;
use crate::core::request::{parse_api, parse_auth};
use crate::core::{Consumer, Deny, authorize, identify};
use crate::metrics::{Endpoint, Metrics, Outcome};
use crate::tdl::TdlCounters;

const API_METHODS: &str = "GET, POST, OPTIONS";
const PROBE_METHODS: &str = "GET, HEAD";

/// Everything a request can reach.
pub struct App {
    pub catalog: ArcSwap<Catalog>,
    pub counters: TdlCounters,
    pub metrics: Metrics,
    pub timezone_name: String,
    pub redis_configured: bool,
    pub ready: AtomicBool,
}

impl App {
    /// Answers one request from its head.
    pub fn respond(&self, request: &Parts) -> Response<Body> {
        let started = Instant::now();
        let path = request.uri.path();
        let (endpoint, outcome, response) = if path == "/auth" || path.starts_with("/auth/") {
            let (outcome, response) = self.auth(request);
            (Endpoint::Auth, outcome, response)
        } else {
            match path {
                "/api/user-metadata" => self.api(request, Endpoint::UserMetadata),
                "/api/tdl-matrix" => self.api(request, Endpoint::TdlMatrix),
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

    fn auth(&self, request: &Parts) -> (Outcome, Response<Body>) {
        let query = parse_auth(&request.uri, &request.method, &request.headers);
        let catalog = self.catalog.load();
        let decision = identify(&catalog, &query.key)
            .and_then(|consumer| Ok((consumer, authorize(&catalog.policy, consumer, &query)?)));
        match decision {
            Ok((consumer, entry)) => {
                self.counters.record(&consumer.username, &entry.id);
                self.metrics.tdl_increment();
                tracing::debug!(consumer = %consumer.username, entry = %entry.id, path = %query.original.path, "allow");
                (Outcome::Allow, answer::allow(consumer, entry))
            }
            Err(reason) => {
                tracing::debug!(?reason, path = %query.original.path, "deny");
                (Outcome::Denied(reason), answer::deny(reason))
            }
        }
    }

    fn api(&self, request: &Parts, endpoint: Endpoint) -> (Endpoint, Outcome, Response<Body>) {
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
        let catalog = self.catalog.load();
        let consumer = match identify(&catalog, &query.key) {
            Ok(consumer) => consumer,
            Err(reason) => return (endpoint, Outcome::Denied(reason), answer::deny(reason)),
        };
        let routes = catalog.policy.route_match(&query.original);
        if !acl_permits(consumer, &routes) {
            return (
                endpoint,
                Outcome::Denied(Deny::Forbidden),
                answer::deny(Deny::Forbidden),
            );
        }
        let body = match endpoint {
            Endpoint::TdlMatrix => self.tdl_matrix_json(&catalog, consumer, &routes),
            _ => catalog
                .policy
                .applicable_list(consumer, &routes)
                .map_or_else(|| "[]".to_owned(), |l| l.json()),
        };
        (endpoint, Outcome::Allow, answer::json(StatusCode::OK, body))
    }

    /// Today's usage for the consumer: the applicable list's entries, then any other entry used today.
    fn tdl_matrix_json(
        &self,
        catalog: &Catalog,
        consumer: &Consumer,
        routes: &crate::core::decide::RouteMatch,
    ) -> String {
        let stamp = self.counters.now();
        let mut usage = self.counters.usage(&consumer.username, stamp.date);
        let lists = catalog.policy.lists_in_precedence(consumer, routes);
        let mut out = String::from("{\"timezone\":");
        write_ascii_json_string(&mut out, &self.timezone_name);
        let _ = write!(
            out,
            ",\"date\":\"{}\",\"slot\":\"T{}\",\"entries\":[",
            stamp.date, stamp.slot
        );
        let mut first = true;
        let mut push = |out: &mut String, id: &str, counts: Option<[u64; 12]>| {
            let entry = lists.iter().find_map(|l| l.find(id));
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str("{\"id\":");
            write_ascii_json_string(out, id);
            out.push_str(",\"provider_name\":");
            write_ascii_json_string(out, entry.map_or("", |e| &e.fields.provider_name));
            out.push_str(",\"tdl_matrix\":");
            out.push_str(entry.map_or("null", |e| e.tdl_matrix_json()));
            out.push_str(",\"usage\":{");
            for (i, n) in counts.unwrap_or_default().iter().enumerate() {
                let _ = write!(out, "{}\"T{}\":{n}", if i > 0 { "," } else { "" }, i + 1);
            }
            out.push_str("}}");
        };
        if let Some(list) = catalog.policy.applicable_list(consumer, routes) {
            for entry in list.entries() {
                let position = usage.iter().position(|(id, _)| *id == entry.id);
                let counts = position.map(|i| usage.remove(i).1);
                push(&mut out, &entry.id, counts);
            }
        }
        for (id, counts) in usage {
            push(&mut out, &id, Some(counts));
        }
        out.push_str("]}");
        out
    }

    fn readiness(&self) -> Response<Body> {
        let ready = self.ready.load(Ordering::Acquire);
        let body = format!(
            "{{\"ready\":{ready},\"redis\":{{\"configured\":{},\"connected\":false}}}}",
            self.redis_configured
        );
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        answer::json(status, body)
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

/// Shared so handlers can be reached from every connection task.
pub type SharedApp = Arc<App>;
