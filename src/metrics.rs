//! Prometheus metrics: one process-wide recorder, handles registered once and kept.
//!
//! The per-request metrics (request counter, latency histogram with explicit buckets — summaries
//! cannot be aggregated across replicas) live in per-thread shards (`request_stats`) and are
//! appended to the exporter's output; everything else goes through the `metrics` crate.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::core::Refusal;
use crate::core::decide::Catalog;
use crate::core::usage::Amount;
use crate::request_stats::RequestStats;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; ours is then unused.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Periodic exporter upkeep (idle-metric bookkeeping); call from a runtime.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// The endpoints counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Auth,
    AuthBody,
    UserMetadata,
    TdlMatrix,
    ApiUsage,
    Usage,
    Other,
}

impl Endpoint {
    fn index(self) -> usize {
        ENDPOINTS
            .iter()
            .position(|e| *e == self)
            .unwrap_or(ENDPOINTS.len() - 1)
    }

    fn label(self) -> &'static str {
        match self {
            Endpoint::Auth => "auth",
            Endpoint::AuthBody => "auth_body",
            Endpoint::UserMetadata => "user_metadata",
            Endpoint::TdlMatrix => "tdl_matrix",
            Endpoint::ApiUsage => "api_usage",
            Endpoint::Usage => "usage",
            Endpoint::Other => "other",
        }
    }
}

/// What happened to a request, as the `decision` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    /// Refused; the index into [`Refusal::LABELS`].
    Refused(usize),
    /// Not a decision: health, metrics, 404, 405, OPTIONS.
    Served,
}

impl Outcome {
    pub fn refused(refusal: &Refusal) -> Outcome {
        Outcome::Refused(refusal.label_index())
    }

    fn label(index: usize) -> &'static str {
        match index {
            0 => "allow",
            i if i <= Refusal::LABELS.len() => Refusal::LABELS[i - 1],
            _ => "served",
        }
    }

    fn index(self) -> usize {
        match self {
            Outcome::Allow => 0,
            Outcome::Refused(i) => 1 + i.min(Refusal::LABELS.len() - 1),
            Outcome::Served => OUTCOMES - 1,
        }
    }
}

const OUTCOMES: usize = crate::request_stats::OUTCOMES;

const ENDPOINTS: [Endpoint; crate::request_stats::ENDPOINTS] = [
    Endpoint::Auth,
    Endpoint::AuthBody,
    Endpoint::UserMetadata,
    Endpoint::TdlMatrix,
    Endpoint::ApiUsage,
    Endpoint::Usage,
    Endpoint::Other,
];

/// Help texts of the metrics other modules own (TDL, Redis), and zero values so that alerts on
/// them have a series to look at from the start.
fn describe_service_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "uma_http_connections_total",
        "TCP connections accepted (low when gateways keep them alive)"
    );
    describe_gauge!(
        "uma_build_info",
        "Always 1; the version label says which build runs"
    );
    describe_gauge!("uma_consumers_loaded", "Consumers in the loaded seed");
    describe_gauge!("uma_keys_loaded", "API keys in the loaded seed");
    describe_gauge!(
        "uma_metadata_entries_loaded",
        "Metadata entries in the consumers' and the global lists of the seed"
    );
    describe_gauge!("uma_seed_routes_loaded", "Routes in the loaded seed");
    describe_gauge!("uma_config_routes_loaded", "Routes in the config file");
    describe_counter!(
        "uma_seed_reloads_total",
        "Seed reloads (SIGHUP, POST /admin/reload, a changed seed file) by result: ok, error (the running seed was kept)"
    );
    describe_gauge!(
        "uma_seed_loaded_timestamp_seconds",
        "When the running seed was loaded (unix seconds): at start or by the last good reload"
    );
    describe_gauge!(
        "uma_header_values_interned_bytes",
        "Bytes of distinct header values kept for the life of the process (grows only with values never loaded before)"
    );
    for result in ["ok", "error"] {
        counter!("uma_seed_reloads_total", "result" => result).increment(0);
    }
    describe_gauge!(
        "uma_redis_configured",
        "1 when redis.url is set, 0 in embedded mode"
    );
    describe_counter!(
        "uma_tdl_increments_total",
        "Allowed calls counted in TDL counters"
    );
    describe_counter!(
        "uma_tdl_dropped_total",
        "TDL increments lost: buffer full, or not written by exit"
    );
    describe_gauge!(
        "uma_tdl_pending_increments",
        "TDL increments not yet confirmed by Redis"
    );
    describe_counter!(
        "uma_tdl_evicted_total",
        "Embedded mode: stored TDL counters evicted, oldest days first, to stay within tdl.max_history_keys"
    );
    describe_counter!(
        "uma_tdl_rejected_writes_total",
        "Consumer shares of TDL writes Redis refused or failed (a key of the wrong type, a field that is not a count); kept in memory and retried"
    );
    describe_gauge!(
        "uma_redis_seed_copies_pending",
        "Seed copies not yet written to Redis since start or the last seed reload (retried until 0)"
    );
    describe_gauge!(
        "uma_redis_up",
        "1 while Redis answers; 0 while it is down or not configured"
    );
    describe_counter!(
        "uma_redis_errors_total",
        "Redis operations that failed or timed out"
    );
    describe_counter!(
        "uma_quota_round_trips_total",
        "Redis round trips for request quota: leases, returned leases, settlements"
    );
    describe_gauge!(
        "uma_quota_leased_unused",
        "Request quota this replica holds in Redis and has not used yet"
    );
    counter!("uma_quota_round_trips_total").increment(0);
    gauge!("uma_quota_leased_unused").set(0.0);
    describe_counter!(
        "uma_redis_corrupt_records_total",
        "Redis records that failed validation and were treated as missing"
    );
    counter!("uma_tdl_increments_total").increment(0);
    counter!("uma_tdl_dropped_total").increment(0);
    counter!("uma_tdl_evicted_total").increment(0);
    counter!("uma_tdl_rejected_writes_total").increment(0);
    counter!("uma_redis_errors_total").increment(0);
    counter!("uma_redis_corrupt_records_total").increment(0);
    gauge!("uma_tdl_pending_increments").set(0.0);
    gauge!("uma_redis_up").set(0.0);
    counter!("uma_http_connections_total").increment(0);
    describe_counter!(
        "uma_usage_records_total",
        "Usage records posted to /usage, by result: accepted, duplicate, rejected"
    );
    describe_counter!(
        "uma_usage_tokens_total",
        "Tokens of accepted usage records, by direction: input, output"
    );
    describe_counter!(
        "uma_usage_dropped_total",
        "Usage records lost: the buffer for Redis was full, or they were not written by exit"
    );
    describe_gauge!(
        "uma_usage_pending_records",
        "Usage records waiting for Redis"
    );
    for result in ["accepted", "duplicate", "rejected"] {
        counter!("uma_usage_records_total", "result" => result).increment(0);
    }
    for direction in ["input", "output"] {
        counter!("uma_usage_tokens_total", "direction" => direction).increment(0);
    }
    counter!("uma_usage_dropped_total").increment(0);
    gauge!("uma_usage_pending_records").set(0.0);
}

/// The cost of accepted usage records, in 10⁻¹² units: kept here because the `metrics` crate's
/// counters are integers of 1, and rendered as a float counter (dashboards only; the exact figures
/// are `/api/usage`'s).
static USAGE_COST: std::sync::Mutex<u128> = std::sync::Mutex::new(0);

pub fn count_usage_cost(amount: Amount) {
    let mut total = USAGE_COST.lock().unwrap_or_else(|e| e.into_inner());
    *total = total.saturating_add(amount.0);
}

fn render_usage_cost(out: &mut String) {
    let total = *USAGE_COST.lock().unwrap_or_else(|e| e.into_inner());
    out.push_str("# HELP uma_usage_cost_total Cost of accepted usage records, in the unit of the entries' prices (approximate)\n");
    out.push_str("# TYPE uma_usage_cost_total counter\n");
    out.push_str(&format!(
        "uma_usage_cost_total {}\n",
        Amount(total).approximate()
    ));
}

/// Pre-registered handles.
pub struct Metrics {
    handle: PrometheusHandle,
    requests: RequestStats,
}

impl Metrics {
    pub fn new(handle: PrometheusHandle) -> Metrics {
        describe_service_metrics();
        describe_admin_metrics();
        gauge!("uma_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Metrics {
            handle,
            requests: RequestStats::default(),
        }
    }

    pub fn observe(&self, endpoint: Endpoint, outcome: Outcome, elapsed: Duration) {
        self.requests
            .observe(endpoint.index(), outcome.index(), elapsed);
    }

    /// Sets the gauges that describe the loaded seed and config.
    pub fn loaded(&self, catalog: &Catalog) {
        gauge!("uma_consumers_loaded").set(catalog.consumers.len() as f64);
        gauge!("uma_keys_loaded").set(catalog.by_key.len() as f64);
        gauge!("uma_metadata_entries_loaded").set(catalog.entry_count() as f64);
        gauge!("uma_seed_routes_loaded").set(catalog.policy.seed_routes.len() as f64);
        gauge!("uma_config_routes_loaded").set(catalog.policy.config_routes.len() as f64);
        gauge!("uma_header_values_interned_bytes")
            .set(crate::core::intern::interned_bytes() as f64);
    }

    /// The running seed was loaded at `at` (start, or a good reload).
    pub fn seed_loaded(&self, at: jiff::Timestamp) {
        gauge!("uma_seed_loaded_timestamp_seconds").set(at.as_millisecond() as f64 / 1000.0);
    }

    /// A reload ended: `ok` (the new seed runs) or `error` (the running one was kept).
    pub fn seed_reloaded(&self, result: &'static str) {
        counter!("uma_seed_reloads_total", "result" => result).increment(1);
    }

    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let endpoints = ENDPOINTS.map(Endpoint::label);
        let outcomes: [&str; OUTCOMES] = std::array::from_fn(Outcome::label);
        let served = Outcome::Served.index();
        // Only combinations that can happen are shown, so `/metrics` has no dead series.
        let possible = |e: usize, o: usize| match ENDPOINTS[e] {
            Endpoint::Other => o == served,
            // The body checks' refusals happen on /auth-body only.
            Endpoint::Auth => o != served && !(o > 0 && Refusal::is_body_label(o - 1)),
            Endpoint::AuthBody => o != served,
            Endpoint::UserMetadata | Endpoint::TdlMatrix | Endpoint::ApiUsage => true,
            Endpoint::Usage => true,
        };
        self.requests
            .render_requests(&mut out, &endpoints, &outcomes, possible);
        self.requests.render_latency(&mut out, &endpoints);
        render_usage_cost(&mut out);
        out
    }
}

/// The admin API's and the invalidation channel's metrics (SPEC §10).
fn describe_admin_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "uma_admin_requests_total",
        "Admin API requests, by answer status"
    );
    describe_gauge!(
        "uma_invalidation_subscribed",
        "1 while this replica is subscribed to the invalidation channel"
    );
    describe_counter!(
        "uma_invalidation_messages_total",
        "Invalidation messages received"
    );
    describe_counter!(
        "uma_invalidation_resubscribes_total",
        "Subscriptions to the invalidation channel made (each one flushes every cached answer)"
    );
    gauge!("uma_invalidation_subscribed").set(0.0);
    counter!("uma_invalidation_messages_total").increment(0);
    counter!("uma_invalidation_resubscribes_total").increment(0);
}
