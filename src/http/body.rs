//! Reading `/auth-body`'s request body (SPEC §8.3), within its bounds, and handing it to the pure
//! checks of [`crate::core::body`].
//!
//! - **When.** Only after the head-level checks (steps 1-5 of SPEC §4) have allowed the call: a
//!   401 or 403 wins over any body problem without a byte of the body being read, so a client
//!   without a valid key can neither make the service buffer bodies nor use up the in-flight
//!   budget. (Such an answer leaves the body unread, and hyper then closes the connection after
//!   it: a cost only refused calls pay.)
//! - **Bounds.** A body announced (or found, while reading) larger than `auth.max_body_bytes` is
//!   413 and reading stops; one not complete within `auth.body_timeout_ms` is 408, and the
//!   unread rest makes hyper close the connection, so it is never left hanging. Each call reserves
//!   its `Content-Length` (or `max_body_bytes` when it announces none, capped at the budget) from
//!   `auth.max_body_bytes_in_flight` for as long as it holds its body: past the budget, 503 Busy.
//! - **Off the runtime.** A body above [`INLINE_BYTES`] is parsed and counted on a blocking thread
//!   (a megabyte of one repeated character costs ~0.2 s of BPE), at most one per core at a time,
//!   so the runtime's workers keep answering `/auth`; smaller ones are checked in place (~0.1 ms).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::sync::Semaphore;

use crate::core::body::{BodyRules, inspect, is_json_content_type};
use crate::core::{Entry, Refusal};
use crate::tokenizer;

/// Bodies up to this size are checked on the runtime thread (well under a millisecond).
pub const INLINE_BYTES: usize = 16 * 1024;

/// What a body read needs: the `[auth]` bounds and the shared budget.
pub struct BodyReader {
    pub max_bytes: u64,
    pub timeout: Duration,
    pub rules: BodyRules,
    budget: Arc<Budget>,
    /// One permit per core: blocking counts never take more than the machine.
    counting: Arc<Semaphore>,
}

impl BodyReader {
    pub fn new(max_bytes: u64, timeout: Duration, in_flight: u64, rules: BodyRules) -> BodyReader {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        BodyReader {
            max_bytes,
            timeout,
            rules,
            budget: Arc::new(Budget {
                used: AtomicU64::new(0),
                max: in_flight,
            }),
            counting: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Step 6 of SPEC §4: reads the body and checks it against `entry`; `Ok` is the input tokens.
    pub async fn check(
        &self,
        headers: &HeaderMap,
        body: Incoming,
        entry: &Arc<Entry>,
    ) -> Result<u64, Refusal> {
        let partial = headers
            .get("x-envoy-auth-partial-body")
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"));
        let announced = body.size_hint().exact();
        if partial || announced.is_some_and(|n| n > self.max_bytes) {
            return Err(Refusal::BodyTooLarge);
        }
        let _reserved = self
            .budget
            .reserve(announced.unwrap_or(self.max_bytes))
            .ok_or(Refusal::Busy)?;
        let bytes = tokio::time::timeout(self.timeout, collect(body, self.max_bytes, announced))
            .await
            .map_err(|_| Refusal::BodyTimeout)??;
        let json_type = headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| is_json_content_type(v.as_bytes()));
        self.inspect(bytes, json_type, entry).await
    }

    async fn inspect(&self, bytes: Bytes, json: bool, entry: &Arc<Entry>) -> Result<u64, Refusal> {
        let rules = self.rules;
        if bytes.len() <= INLINE_BYTES
            && let Some(counter) = tokenizer::built()
        {
            return inspect(&bytes, json, &entry.fields, rules, &counter);
        }
        let _permit = self
            .counting
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::Busy)?;
        let entry = entry.clone();
        let counted = tokio::task::spawn_blocking(move || {
            // Bundled with the crate: missing only in a broken build, which must not let bodies
            // pass unchecked. Waits here (off the runtime) if the encoder is still being built.
            let counter = tokenizer::o200k().ok_or(Refusal::Busy)?;
            inspect(&bytes, json, &entry.fields, rules, &counter)
        })
        .await;
        // A failed task (it cannot panic on input, but a runtime shutting down can cancel it).
        counted.unwrap_or(Err(Refusal::Busy))
    }
}

/// The body's bytes, refused as too large as soon as they pass `max`. A body that fails to arrive
/// (the client went away, a broken chunked encoding) was not received.
pub(super) async fn collect(
    mut body: Incoming,
    max: u64,
    announced: Option<u64>,
) -> Result<Bytes, Refusal> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let expected = announced.map_or(8192, |n| usize::try_from(n).unwrap_or(max));
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| Refusal::BodyTimeout)?.into_data() else {
            continue; // trailers
        };
        let held = first.as_ref().map_or(0, Bytes::len) + joined.len();
        if held.saturating_add(data.len()) > max {
            return Err(Refusal::BodyTooLarge);
        }
        // One frame (the usual case) is kept as it came; a second one starts a copy.
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(earlier) => {
                joined.reserve(expected.min(max).max(earlier.len() + data.len()));
                joined.extend_from_slice(&earlier);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// The bytes reserved by bodies being read (`auth.max_body_bytes_in_flight`).
struct Budget {
    used: AtomicU64,
    max: u64,
}

impl Budget {
    /// Reserves `bytes` (at most the whole budget, so one body alone always fits).
    fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let bytes = bytes.min(self.max);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Bytes of the budget held until the body is dropped.
struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_bound_and_frees_on_drop() {
        let budget = Arc::new(Budget {
            used: AtomicU64::new(0),
            max: 100,
        });
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(50).is_none());
        let b = budget.reserve(40).unwrap();
        assert!(budget.reserve(1).is_none());
        drop(a);
        // Larger than the whole budget: capped, so it fits once alone.
        assert!(budget.reserve(1000).is_none());
        drop(b);
        let whole = budget.reserve(1000).unwrap();
        assert_eq!(budget.used.load(Ordering::Acquire), 100);
        drop(whole);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
        assert!(budget.reserve(0).is_some());
    }
}
