//! Per-request metrics — the request counter and the latency histogram — in per-thread shards.
//!
//! They change on every request. Through the `metrics` crate each change is an atomic add on a
//! location shared by all worker threads (a cache line bouncing between cores), and the exporter's
//! histogram also stores every sample until the next scrape: together about 15% of `/auth`
//! throughput, measured. Here each worker thread adds to a shard of its own, padded to its own cache
//! lines; a scrape sums the shards and renders the usual Prometheus counter and histogram.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Enough for the worker threads of a sidecar; more threads share shards (still correct).
const SHARDS: usize = 16;
pub const ENDPOINTS: usize = 7;
/// Allowed, each refusal label, served (see `metrics::Outcome`).
pub const OUTCOMES: usize = crate::core::Refusal::LABELS.len() + 2;

/// Histogram upper bounds in nanoseconds and as printed (`le`): 25 µs (a warm `/auth`) to 1 s.
const BOUNDS: [(u64, &str); 14] = [
    (25_000, "0.000025"),
    (50_000, "0.00005"),
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (1_000_000_000, "1"),
];
const BUCKETS: usize = BOUNDS.len() + 1;

#[derive(Default)]
#[repr(align(128))]
struct Shard {
    requests: [[AtomicU64; OUTCOMES]; ENDPOINTS],
    /// Per-bucket (not cumulative) counts; the last bucket is `+Inf`.
    buckets: [[AtomicU64; BUCKETS]; ENDPOINTS],
    sum_nanos: [AtomicU64; ENDPOINTS],
}

/// The shard of the calling thread, fixed on its first request.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    SHARD.with(|shard| *shard)
}

pub struct RequestStats {
    shards: Box<[Shard]>,
}

impl Default for RequestStats {
    fn default() -> Self {
        RequestStats {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl RequestStats {
    /// Counts one answered request of `endpoint` with `outcome` (indices into the caller's labels).
    pub fn observe(&self, endpoint: usize, outcome: usize, elapsed: Duration) {
        let shard = &self.shards[shard_index()];
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS.partition_point(|(bound, _)| *bound < nanos);
        shard.requests[endpoint][outcome].fetch_add(1, Ordering::Relaxed);
        shard.buckets[endpoint][bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_nanos[endpoint].fetch_add(nanos, Ordering::Relaxed);
    }

    fn total(&self, read: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| read(s).load(Ordering::Relaxed))
            .sum()
    }

    /// `uma_requests_total` for every (endpoint, outcome) that `shown` admits.
    pub fn render_requests(
        &self,
        out: &mut String,
        endpoint_labels: &[&str; ENDPOINTS],
        outcome_labels: &[&str; OUTCOMES],
        shown: impl Fn(usize, usize) -> bool,
    ) {
        out.push_str("# HELP uma_requests_total Requests answered, by endpoint and decision\n");
        out.push_str("# TYPE uma_requests_total counter\n");
        for (e, endpoint) in endpoint_labels.iter().enumerate() {
            for (o, outcome) in outcome_labels
                .iter()
                .enumerate()
                .filter(|(o, _)| shown(e, *o))
            {
                let n = self.total(|s| &s.requests[e][o]);
                let _ = writeln!(
                    out,
                    "uma_requests_total{{endpoint=\"{endpoint}\",decision=\"{outcome}\"}} {n}"
                );
            }
        }
    }

    /// `uma_request_duration_seconds` per endpoint: cumulative buckets, `_sum`, `_count`.
    pub fn render_latency(&self, out: &mut String, endpoint_labels: &[&str; ENDPOINTS]) {
        let name = "uma_request_duration_seconds";
        out.push_str(
            "# HELP uma_request_duration_seconds Time from request head to answer, by endpoint\n",
        );
        out.push_str("# TYPE uma_request_duration_seconds histogram\n");
        for (e, endpoint) in endpoint_labels.iter().enumerate() {
            let mut cumulative = 0;
            for bucket in 0..BUCKETS {
                cumulative += self.total(|s| &s.buckets[e][bucket]);
                let le = BOUNDS.get(bucket).map_or("+Inf", |(_, text)| text);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{endpoint=\"{endpoint}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = self.total(|s| &s.sum_nanos[e]) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{endpoint=\"{endpoint}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{endpoint=\"{endpoint}\"}} {cumulative}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up_and_buckets_are_cumulative() {
        let stats = std::sync::Arc::new(RequestStats::default());
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    stats.observe(0, 0, Duration::from_micros(10));
                    stats.observe(0, 0, Duration::from_micros(25));
                    stats.observe(0, 1, Duration::from_secs(5));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut out = String::new();
        stats.render_requests(
            &mut out,
            &["auth", "b", "c", "d", "e", "f", "g"],
            &std::array::from_fn(|i| ["allow", "no_key"].get(i).copied().unwrap_or("x")),
            |e, o| e == 0 && o < 2,
        );
        assert!(
            out.contains("uma_requests_total{endpoint=\"auth\",decision=\"allow\"} 6\n"),
            "{out}"
        );
        assert!(out.contains("uma_requests_total{endpoint=\"auth\",decision=\"no_key\"} 3\n"));
        assert!(!out.contains("endpoint=\"b\""));
        let mut out = String::new();
        stats.render_latency(&mut out, &["auth", "b", "c", "d", "e", "f", "g"]);
        let bucket = |le: &str| {
            format!("uma_request_duration_seconds_bucket{{endpoint=\"auth\",le=\"{le}\"}} ")
        };
        assert!(out.contains(&format!("{}6\n", bucket("0.000025"))), "{out}");
        assert!(out.contains(&format!("{}6\n", bucket("1"))));
        assert!(out.contains(&format!("{}9\n", bucket("+Inf"))));
        assert!(out.contains("uma_request_duration_seconds_count{endpoint=\"auth\"} 9\n"));
        assert!(
            out.contains("uma_request_duration_seconds_sum{endpoint=\"auth\"} 15.000105\n"),
            "{out}"
        );
    }
}
