//! Building answers: the decision table of SPEC §4 and the JSON bodies of the other endpoints.
//!
//! Every answer carries `Cache-Control: no-store`. A refusal's body and headers follow from the
//! refusal alone; an allow answer clones twelve precomputed header values.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::core::format::write_ascii_json_string;
use crate::core::{Consumer, Entry, RateLimitFields, Refusal};

pub type Body = Full<Bytes>;

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const BEARER_REALM: HeaderValue = HeaderValue::from_static("Bearer realm=\"user-metadata-auth\"");
const KEY_REALM: HeaderValue = HeaderValue::from_static("Key realm=\"user-metadata-auth\"");

/// 200 with the twelve metadata headers and an empty body (keeps nginx and Caddy connections alive).
pub fn allow(consumer: &Consumer, entry: &Arc<Entry>) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.headers_mut() = consumer.answer_headers(entry);
    response
}

/// The answer to a refusal (SPEC §4): its status, its JSON message, and the headers it needs.
pub fn refuse(refusal: &Refusal) -> Response<Body> {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    // Escaped: a message may carry the client's own text (a model name).
    let mut body = String::from("{\"message\":");
    write_ascii_json_string(&mut body, &refusal.message());
    body.push('}');
    let mut response = json(status, body);
    let headers = response.headers_mut();
    match status {
        StatusCode::UNAUTHORIZED if *refusal == Refusal::UsageToken => {
            headers.insert(WWW_AUTHENTICATE, BEARER_REALM);
        }
        StatusCode::UNAUTHORIZED => {
            headers.insert(WWW_AUTHENTICATE, KEY_REALM);
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    if let Some((by, kind)) = refusal.limited_by() {
        headers.insert(
            HeaderName::from_static("x-uma-limit"),
            HeaderValue::from_static(kind),
        );
        if let Ok(seconds) = HeaderValue::from_str(&by.retry_after.to_string()) {
            headers.insert(RETRY_AFTER, seconds);
        }
        rate_limit_fields(&mut response, by.fields.clone());
    }
    response
}

/// `RateLimit-Policy` and `RateLimit` (SPEC §8.1), on a 200 or a 429 for an entry with limits.
pub fn rate_limit_fields(response: &mut Response<Body>, fields: RateLimitFields) {
    let headers = response.headers_mut();
    // Built from integers and fixed names only, so always valid header values; the strings are
    // moved into the values, not copied. No member in force (a slot map without this slot): no
    // field, so the placeholders an allow answer carries go.
    for (name, value) in [(RATELIMIT_POLICY, fields.policy), (RATELIMIT, fields.state)] {
        match HeaderValue::from_maybe_shared(Bytes::from(value)) {
            Ok(value) if !value.is_empty() => {
                headers.insert(name, value);
            }
            _ => {
                headers.remove(name);
            }
        }
    }
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    text(status, "application/json", body)
}

pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Body::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, NO_STORE);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn not_found() -> Response<Body> {
    json(StatusCode::NOT_FOUND, &br#"{"message":"Not found"}"#[..])
}

pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &br#"{"message":"Method not allowed"}"#[..],
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// 204 with `Allow`, for OPTIONS.
pub fn options(allow: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}
