//! The admin API's HTTP adapter (SPEC §10): its own listener, bearer tokens, routing, and the one
//! place an [`AdminError`] becomes an answer.
//!
//! Every request needs `Authorization: Bearer <token>`, compared in constant time with each
//! configured token; a failed check is logged (never the token) and counts against the client's
//! address, which after [`FAILURES_PER_SECOND`] failures in a second gets 429 without any check.
//! The operations themselves live in [`crate::admin`]; this module only reads requests and writes
//! answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use rustc_hash::FxHashMap;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::answer::{self, Body};
use crate::admin::{Actor, Admin, AdminError, ReloadTrigger};
use crate::config::AdminToken;
use crate::core::path::hex_value;

/// Failed token checks allowed per client address per second (SPEC §10); past it 429.
pub const FAILURES_PER_SECOND: u32 = 10;

/// Largest admin request body read (a consumer with a long metadata list fits many times over).
const MAX_BODY_BYTES: u64 = 4 << 20;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin listener's state.
pub struct AdminApp {
    pub admin: Arc<Admin>,
    tokens: Vec<AdminToken>,
    failures: Mutex<FxHashMap<IpAddr, Failures>>,
}

/// Failed checks of one address within the current second.
#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

impl super::Respond for AdminApp {
    async fn respond(&self, request: &Parts, body: Incoming, peer: SocketAddr) -> Response<Body> {
        let response = match self.authenticate(request, peer.ip()) {
            Ok(actor) => match self.route(request, body, &actor).await {
                Ok(response) => response,
                Err(error) => error_answer(&error),
            },
            Err(refused) => refused.answer(),
        };
        metrics::counter!("uma_admin_requests_total", "status" => response.status().as_str().to_owned())
            .increment(1);
        response
    }
}

impl AdminApp {
    pub fn new(admin: Arc<Admin>, tokens: Vec<AdminToken>) -> AdminApp {
        AdminApp {
            admin,
            tokens,
            failures: Mutex::default(),
        }
    }

    /// The actor a request's bearer token names, or why there is none.
    fn authenticate(&self, request: &Parts, ip: IpAddr) -> Result<Actor, TokenRefusal> {
        if self.throttled(ip) {
            return Err(TokenRefusal::Throttled);
        }
        let given = request
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::trim_ascii)
            .unwrap_or_default();
        // Every token is compared, so the time taken does not tell which one nearly matched.
        let mut found = None;
        for token in &self.tokens {
            if bool::from(given.ct_eq(token.token.as_bytes())) {
                found = Some(token.name.clone());
            }
        }
        match found {
            Some(name) => Ok(Actor(name)),
            None => {
                self.failed(ip);
                tracing::warn!(
                    client = %ip,
                    method = %request.method,
                    path = request.uri.path(),
                    presented = !given.is_empty(),
                    "admin request refused: invalid or missing token"
                );
                Err(TokenRefusal::Invalid)
            }
        }
    }

    fn throttled(&self, ip: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        failures.get(&ip).is_some_and(|f| {
            f.since.elapsed() < Duration::from_secs(1) && f.count >= FAILURES_PER_SECOND
        })
    }

    fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // Bounded: addresses whose second is over are forgotten whenever the map grows large.
        if failures.len() > 10_000 {
            failures.retain(|_, f| now.duration_since(f.since) < Duration::from_secs(1));
        }
        let entry = failures.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now.duration_since(entry.since) >= Duration::from_secs(1) {
            *entry = Failures {
                since: now,
                count: 0,
            };
        }
        entry.count += 1;
    }

    async fn route(
        &self,
        request: &Parts,
        body: Incoming,
        actor: &Actor,
    ) -> Result<Response<Body>, AdminError> {
        let path = request.uri.path();
        let query = request.uri.query().unwrap_or_default();
        let segments: Vec<&str> = path
            .strip_prefix("/admin/")
            .map(|rest| rest.trim_end_matches('/').split('/').collect())
            .unwrap_or_default();
        let method = &request.method;
        let admin = &self.admin;
        match (method, segments.as_slice()) {
            (&Method::GET, ["consumers"]) => ok(admin.list_consumers(&params(query)).await?),
            (&Method::GET, ["consumers", name]) => Ok(raw_answer(
                StatusCode::OK,
                admin.consumer(&decode(name)?).await?,
            )),
            (&Method::PUT, ["consumers", name]) => {
                let body = read_json(body).await?;
                let (created, answer) = admin.put_consumer(actor, &decode(name)?, &body).await?;
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(raw_answer(status, answer))
            }
            (&Method::DELETE, ["consumers", name]) => {
                ok(admin.delete_consumer(actor, &decode(name)?).await?)
            }
            (&Method::POST, ["consumers", name, "keys"]) => {
                let body = read_json_or_empty(body).await?;
                let answer = admin.create_key(actor, &decode(name)?, &body).await?;
                Ok(json_answer(StatusCode::CREATED, &answer))
            }
            (&Method::POST, ["consumers", name, "keys", id, "rotate"]) => {
                let body = read_json_or_empty(body).await?;
                let answer = admin
                    .rotate_key(actor, &decode(name)?, &decode(id)?, &body)
                    .await?;
                Ok(json_answer(StatusCode::CREATED, &answer))
            }
            (&Method::PATCH, ["consumers", name, "keys", id]) => {
                let body = read_json(body).await?;
                ok(admin
                    .patch_key(actor, &decode(name)?, &decode(id)?, &body)
                    .await?)
            }
            (&Method::DELETE, ["consumers", name, "keys", id]) => ok(admin
                .revoke_key(actor, &decode(name)?, &decode(id)?)
                .await?),
            (&Method::POST, ["reload"]) => {
                let (status, answer) = admin.reload(actor, ReloadTrigger::Api).await;
                Ok(json_answer(status, &answer))
            }
            (&Method::GET, ["usage"]) => {
                let csv = request
                    .headers
                    .get(ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("text/csv"));
                let export = admin.usage_export(&params(query), csv).await?;
                Ok(match export {
                    crate::admin::Export::Json(value) => json_answer(StatusCode::OK, &value),
                    crate::admin::Export::Csv(text) => {
                        answer::text(StatusCode::OK, "text/csv; charset=utf-8", text)
                    }
                })
            }
            (&Method::GET, ["audit"]) => ok(admin.audit(&params(query)).await?),
            (_, ["consumers"]) | (_, ["audit"]) | (_, ["usage"]) => {
                Ok(answer::method_not_allowed("GET"))
            }
            (_, ["consumers", _]) => Ok(answer::method_not_allowed("GET, PUT, DELETE")),
            (_, ["consumers", _, "keys"]) | (_, ["reload"]) => {
                Ok(answer::method_not_allowed("POST"))
            }
            (_, ["consumers", _, "keys", _]) => Ok(answer::method_not_allowed("PATCH, DELETE")),
            (_, ["consumers", _, "keys", _, "rotate"]) => Ok(answer::method_not_allowed("POST")),
            _ => Ok(answer::not_found()),
        }
    }
}

/// Why a request got no actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenRefusal {
    /// Missing or wrong token: 401.
    Invalid,
    /// Too many failures from this address this second: 429, without a check.
    Throttled,
}

impl TokenRefusal {
    fn answer(self) -> Response<Body> {
        match self {
            TokenRefusal::Invalid => {
                let mut response = message(StatusCode::UNAUTHORIZED, "Invalid admin token");
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"user-metadata-auth admin\""),
                );
                response
            }
            TokenRefusal::Throttled => {
                let mut response = message(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many failed admin token checks",
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}

/// Query parameters by name (the last one wins).
fn params(query: &str) -> FxHashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A path segment, percent-decoded.
fn decode(segment: &str) -> Result<String, AdminError> {
    let bytes: Vec<u8> = percent_decode(segment.as_bytes())
        .ok_or_else(|| AdminError::BadRequest("Malformed percent-encoding in the path".into()))?;
    String::from_utf8(bytes).map_err(|_| AdminError::BadRequest("The path is not UTF-8".into()))
}

fn percent_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = hex_value(*bytes.get(i + 1)?)?;
            let low = hex_value(*bytes.get(i + 2)?)?;
            out.push(high * 16 + low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

async fn read_bytes(body: Incoming) -> Result<Bytes, AdminError> {
    let announced = hyper::body::Body::size_hint(&body).exact();
    if announced.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(AdminError::TooLarge);
    }
    match tokio::time::timeout(
        BODY_TIMEOUT,
        super::body::collect(body, MAX_BODY_BYTES, announced),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(crate::core::Refusal::BodyTooLarge)) => Err(AdminError::TooLarge),
        Ok(Err(_)) | Err(_) => Err(AdminError::BadRequest(
            "The request body could not be read".into(),
        )),
    }
}

async fn read_json(body: Incoming) -> Result<Value, AdminError> {
    let bytes = read_bytes(body).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AdminError::BadRequest(format!("The body is not valid JSON: {e}")))
}

/// A body that may be left out (`{}` then).
async fn read_json_or_empty(body: Incoming) -> Result<Value, AdminError> {
    let bytes = read_bytes(body).await?;
    if bytes.trim_ascii().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| AdminError::BadRequest(format!("The body is not valid JSON: {e}")))
}

fn ok(value: Value) -> Result<Response<Body>, AdminError> {
    Ok(json_answer(StatusCode::OK, &value))
}

fn raw_answer(status: StatusCode, json: crate::admin::RawJson) -> Response<Body> {
    answer::json(status, json.0)
}

fn json_answer(status: StatusCode, value: &Value) -> Response<Body> {
    answer::json(status, value.to_string())
}

fn message(status: StatusCode, text: &str) -> Response<Body> {
    json_answer(status, &json!({ "message": text }))
}

/// The one place an admin error becomes an answer.
pub fn error_answer(error: &AdminError) -> Response<Body> {
    let status = error.status();
    let mut response = match error {
        AdminError::Invalid {
            message: text,
            problems,
        } => json_answer(
            status,
            &json!({
                "message": text,
                "problems": problems
                    .iter()
                    .map(|p| json!({"field": p.field, "reason": p.reason}))
                    .collect::<Vec<_>>(),
            }),
        ),
        other => message(status, &other.to_string()),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded_strictly() {
        assert_eq!(decode("team%2Da").unwrap(), "team-a");
        assert_eq!(decode("%EB%AF%BF").unwrap(), "믿");
        for bad in ["%", "%2", "%+1", "%zz", "%ff"] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }
}
