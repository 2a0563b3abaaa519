//! Building answers: the decision table of SPEC §4 and the JSON bodies of the other endpoints.
//!
//! Every answer carries `Cache-Control: no-store`. Deny bodies and their headers are static; an allow
//! answer clones twelve precomputed header values.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::core::{Consumer, Deny, Entry};

pub type Body = Full<Bytes>;

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const KEY_REALM: HeaderValue = HeaderValue::from_static("Key realm=\"user-metadata-auth\"");

/// 200 with the twelve metadata headers and an empty body (keeps nginx and Caddy connections alive).
pub fn allow(consumer: &Consumer, entry: &Arc<Entry>) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.headers_mut() = consumer.answer_headers(entry);
    response
}

pub fn deny(reason: Deny) -> Response<Body> {
    let (status, message) = match reason {
        Deny::NoKey => (
            StatusCode::UNAUTHORIZED,
            r#"{"message":"No API key found in request"}"#,
        ),
        Deny::InvalidKey => (
            StatusCode::UNAUTHORIZED,
            r#"{"message":"Invalid authentication credentials"}"#,
        ),
        Deny::DuplicateKey => (
            StatusCode::UNAUTHORIZED,
            r#"{"message":"Duplicate API key found"}"#,
        ),
        Deny::Forbidden => (
            StatusCode::FORBIDDEN,
            r#"{"message":"You cannot consume this service"}"#,
        ),
        Deny::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"message":"Metadata store unavailable"}"#,
        ),
    };
    let mut response = json(status, Bytes::from_static(message.as_bytes()));
    let headers = response.headers_mut();
    match status {
        StatusCode::UNAUTHORIZED => {
            headers.insert(WWW_AUTHENTICATE, KEY_REALM);
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    response
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, NO_STORE);
    headers.insert(CONTENT_TYPE, JSON);
    response
}

pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Body::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
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
