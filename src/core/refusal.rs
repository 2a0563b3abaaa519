//! Why a request is refused: one enum with the data each answer needs, checked in SPEC §4's order.
//!
//! The decision core returns a [`Refusal`]; the HTTP adapter turns it into status, body and
//! headers in one place (`http::answer::refuse`), and metrics label it by [`Refusal::label`]. Later
//! checks (capabilities, body limits, quotas) add variants here, carrying what their answers need;
//! new variants go at the end, so the labels (and dashboards built on them) keep their numbers.

use std::borrow::Cow;

/// A refused request, by the check that refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the source set gives no URI.
    UriMissing,
    /// 400: a URI source is present but cannot be read.
    InvalidUri,
    /// 400: a method or host source is present but cannot be read.
    InvalidRequest,
    /// 400: the present sources describe different requests.
    ConflictingRequest,
    /// 400: one entry selector given twice with different values.
    ConflictingMetadataId,
    /// 401: `auth.gateway_secret` is set and was not given.
    UnknownGateway,
    /// 401: the same key name twice.
    DuplicateKey,
    /// 401: no key anywhere.
    NoKey,
    /// 503: the key is in no local source and the metadata store cannot be asked.
    Unavailable,
    /// 401: the key is unknown (or expired, disabled, revoked).
    InvalidKey,
    /// 403: refused by a route or the entitlement; the reason is for logs only, the answer is the
    /// same for all (a client learns nothing about which rule it hit).
    Forbidden(Forbidden),
    /// 403: the chosen entry lacks a capability a matched route requires (SPEC §8.2); its name.
    MissingCapability(String),
    /// 429: a request limit of the chosen entry is reached (SPEC §8.1); carries the answer's
    /// `Retry-After` and RateLimit fields.
    RateLimited(Box<RateLimitedBy>),
    /// 429: a token or cost budget of the chosen entry is used up by recorded usage (SPEC §8.1,
    /// §9); carries the same fields as [`Refusal::RateLimited`].
    BudgetExceeded(Box<RateLimitedBy>),
    /// 401 (`POST /usage`, SPEC §9): no bearer token, or not `usage.token`.
    UsageToken,
    /// 400 (`POST /usage`): an array of more than [`MAX_USAGE_RECORDS`] records.
    TooManyRecords,
    /// 413 (`/auth-body`, SPEC §8.3): the body is larger than `auth.max_body_bytes`, or the
    /// gateway says it sent only part of it (`x-envoy-auth-partial-body: true`).
    BodyTooLarge,
    /// 408: the body was not complete within `auth.body_timeout_ms`.
    BodyTimeout,
    /// 400: the body's shape or a token field cannot be used.
    BadBody(BadBody),
    /// 403: the entry has `models` and the body's `model` is none of them; carries the model as
    /// the body named it (shortened), for the answer.
    ModelNotAllowed(String),
    /// 403: a requested output exceeds the entry's `max_output_tokens` (carried).
    OutputTokens(u64),
    /// 413: the body's input counts more tokens than the entry's `max_input_tokens`.
    InputTokens { count: u64, limit: u64 },
    /// 503: the bodies being read already reserve `auth.max_body_bytes_in_flight`.
    Busy,
}

/// The most records one `POST /usage` may carry (SPEC §9; Kong's largest batches fit).
pub const MAX_USAGE_RECORDS: usize = 1000;

/// Why a body answered 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadBody {
    /// `Content-Type: application/json` and not JSON, or an inspected field given twice.
    NotJson,
    /// A max-tokens field or `n` that is not a non-negative integer.
    InvalidMaxTokens,
    /// No max-tokens field while `auth.require_max_tokens` is on.
    MaxTokensRequired,
}

/// The longest model name an answer repeats: the rest is the client's own text, echoed back.
const MAX_ECHOED_MODEL: usize = 200;

/// Which windows refused a call, as the 429 answer writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitedBy {
    pub retry_after: u64,
    /// `RateLimit-Policy` and `RateLimit`.
    pub fields: RateLimitFields,
}

/// The two RateLimit fields of an answer for an entry with limits (200 and 429 alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitFields {
    pub policy: String,
    pub state: String,
}

/// Which rule answered 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// `X-Uma-Route` named a route the seed does not have.
    UnknownRoute,
    /// A seed or config route's ACL.
    Acl,
    /// The chosen entry is not in the applicable list, or no list applies.
    Entitlement,
}

impl Refusal {
    /// Every metrics label, in the order [`Refusal::label_index`] numbers them.
    pub const LABELS: [&'static str; 18] = [
        "bad_request",
        "unknown_gateway",
        "duplicate_key",
        "no_key",
        "unavailable",
        "invalid_key",
        "forbidden",
        "rate_limited",
        "body_too_large",
        "body_timeout",
        "bad_body",
        "model_not_allowed",
        "output_tokens",
        "input_tokens",
        "busy",
        "budget_exceeded",
        "usage_token",
        "too_many_records",
    ];

    /// The `decision` label of `uma_requests_total`.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.label_index()]
    }

    pub fn label_index(&self) -> usize {
        match self {
            Refusal::UriMissing
            | Refusal::InvalidUri
            | Refusal::InvalidRequest
            | Refusal::ConflictingRequest
            | Refusal::ConflictingMetadataId => 0,
            Refusal::UnknownGateway => 1,
            Refusal::DuplicateKey => 2,
            Refusal::NoKey => 3,
            Refusal::Unavailable => 4,
            Refusal::InvalidKey => 5,
            Refusal::Forbidden(_) | Refusal::MissingCapability(_) => 6,
            Refusal::RateLimited(_) => 7,
            Refusal::BodyTooLarge => 8,
            Refusal::BodyTimeout => 9,
            Refusal::BadBody(_) => 10,
            Refusal::ModelNotAllowed(_) => 11,
            Refusal::OutputTokens(_) => 12,
            Refusal::InputTokens { .. } => 13,
            Refusal::Busy => 14,
            Refusal::BudgetExceeded(_) => 15,
            Refusal::UsageToken => 16,
            Refusal::TooManyRecords => 17,
        }
    }

    /// Whether the label at `index` can only come from `/auth-body`'s body checks (so `/auth`
    /// shows no series for it).
    pub fn is_body_label(index: usize) -> bool {
        (Refusal::BodyTooLarge.label_index()..=Refusal::Busy.label_index()).contains(&index)
    }

    /// A 429's windows, and which kind of limit refused (`X-Uma-Limit`: `requests` or `budget`, so
    /// a gateway that rebuilds the body, as nginx must, can say which).
    pub fn limited_by(&self) -> Option<(&RateLimitedBy, &'static str)> {
        match self {
            Refusal::RateLimited(by) => Some((by, "requests")),
            Refusal::BudgetExceeded(by) => Some((by, "budget")),
            _ => None,
        }
    }

    /// 403 for `model` (shortened to a bounded length: the answer echoes the client's text).
    pub fn model_not_allowed(model: &str) -> Refusal {
        let mut end = model.len().min(MAX_ECHOED_MODEL);
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        Refusal::ModelNotAllowed(model[..end].to_owned())
    }

    /// The JSON body's message, exactly as SPEC §4 and §8.3 write it (not yet JSON-escaped: a
    /// model name is the client's text).
    pub fn message(&self) -> Cow<'static, str> {
        let text = match self {
            Refusal::MissingCapability(name) => {
                return Cow::Owned(format!("Capability not enabled: {name}"));
            }
            Refusal::UriMissing => "Original URI missing",
            Refusal::InvalidUri => "Invalid original URI",
            Refusal::InvalidRequest => "Invalid original request",
            Refusal::ConflictingRequest => "Conflicting original request",
            Refusal::ConflictingMetadataId => "Conflicting metadata_id",
            Refusal::UnknownGateway => "Unknown gateway",
            Refusal::DuplicateKey => "Duplicate API key found",
            Refusal::NoKey => "No API key found in request",
            Refusal::Unavailable => "Metadata store unavailable",
            Refusal::InvalidKey => "Invalid authentication credentials",
            Refusal::Forbidden(_) => "You cannot consume this service",
            Refusal::RateLimited(_) => "API rate limit exceeded",
            Refusal::BudgetExceeded(_) => "Usage budget exceeded",
            Refusal::UsageToken => "Invalid usage token",
            Refusal::TooManyRecords => "Too many records (at most 1000)",
            Refusal::BodyTooLarge => "Request body too large",
            Refusal::BodyTimeout => "Request body not received",
            Refusal::BadBody(BadBody::NotJson) => "Request body is not valid JSON",
            Refusal::BadBody(BadBody::InvalidMaxTokens) => "Invalid max_tokens",
            Refusal::BadBody(BadBody::MaxTokensRequired) => "max_tokens is required",
            Refusal::Busy => "Busy",
            Refusal::ModelNotAllowed(model) => {
                return Cow::Owned(format!("Model not allowed: {model}"));
            }
            Refusal::OutputTokens(limit) => {
                return Cow::Owned(format!(
                    "Requested output tokens exceed the limit of {limit}"
                ));
            }
            Refusal::InputTokens { count, limit } => {
                return Cow::Owned(format!(
                    "Input of {count} tokens exceeds the limit of {limit}"
                ));
            }
        };
        Cow::Borrowed(text)
    }

    pub fn status(&self) -> u16 {
        match self {
            Refusal::UriMissing
            | Refusal::InvalidUri
            | Refusal::InvalidRequest
            | Refusal::ConflictingRequest
            | Refusal::ConflictingMetadataId
            | Refusal::BadBody(_)
            | Refusal::TooManyRecords => 400,
            Refusal::UnknownGateway
            | Refusal::DuplicateKey
            | Refusal::NoKey
            | Refusal::InvalidKey
            | Refusal::UsageToken => 401,
            Refusal::Forbidden(_)
            | Refusal::MissingCapability(_)
            | Refusal::ModelNotAllowed(_)
            | Refusal::OutputTokens(_) => 403,
            Refusal::BodyTimeout => 408,
            Refusal::BodyTooLarge | Refusal::InputTokens { .. } => 413,
            Refusal::RateLimited(_) | Refusal::BudgetExceeded(_) => 429,
            Refusal::Unavailable | Refusal::Busy => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_statuses() {
        assert_eq!(Refusal::InvalidUri.label(), "bad_request");
        assert_eq!(Refusal::Forbidden(Forbidden::Acl).label(), "forbidden");
        assert_eq!(Refusal::Forbidden(Forbidden::Acl).status(), 403);
        assert_eq!(Refusal::UnknownGateway.status(), 401);
        assert_eq!(Refusal::Unavailable.status(), 503);
        assert_eq!(Refusal::NoKey.message(), "No API key found in request");
    }

    #[test]
    fn body_refusals_carry_their_numbers_and_labels() {
        let input = Refusal::InputTokens {
            count: 51234,
            limit: 50000,
        };
        assert_eq!(
            input.message(),
            "Input of 51234 tokens exceeds the limit of 50000"
        );
        assert_eq!((input.status(), input.label()), (413, "input_tokens"));
        let output = Refusal::OutputTokens(20000);
        assert_eq!(
            output.message(),
            "Requested output tokens exceed the limit of 20000"
        );
        assert_eq!(output.status(), 403);
        assert_eq!(
            Refusal::model_not_allowed("gpt-5").message(),
            "Model not allowed: gpt-5"
        );
        let long = Refusal::model_not_allowed(&"é".repeat(300));
        assert!(long.message().len() <= 20 + MAX_ECHOED_MODEL);
        assert_eq!(Refusal::Busy.status(), 503);
        assert_eq!(Refusal::BodyTimeout.status(), 408);
        assert_eq!(Refusal::BadBody(BadBody::NotJson).label(), "bad_body");
        // Every variant has its own label, in the order of LABELS.
        assert_eq!(
            Refusal::TooManyRecords.label_index(),
            Refusal::LABELS.len() - 1
        );
        assert_eq!(Refusal::UsageToken.message(), "Invalid usage token");
        assert_eq!(Refusal::UsageToken.status(), 401);
        assert_eq!(Refusal::TooManyRecords.status(), 400);
        assert!(Refusal::is_body_label(Refusal::BodyTooLarge.label_index()));
        assert!(Refusal::is_body_label(Refusal::Busy.label_index()));
        assert!(!Refusal::is_body_label(
            Refusal::RateLimited(Box::new(RateLimitedBy {
                retry_after: 1,
                fields: RateLimitFields {
                    policy: String::new(),
                    state: String::new()
                }
            }))
            .label_index()
        ));
    }
}
