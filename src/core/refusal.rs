//! Why a request is refused: one enum with the data each answer needs, checked in SPEC §4's order.
//!
//! The decision core returns a [`Refusal`]; the HTTP adapter turns it into status, body and
//! headers in one place (`http::answer::refuse`), and metrics label it by [`Refusal::label`]. Later
//! checks (capabilities, body limits, quotas) add variants here, carrying what their answers need.

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
}

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
    pub const LABELS: [&'static str; 8] = [
        "bad_request",
        "unknown_gateway",
        "duplicate_key",
        "no_key",
        "unavailable",
        "invalid_key",
        "forbidden",
        "rate_limited",
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
        }
    }

    /// The JSON body's message, exactly as SPEC §4 and §8 write it.
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
        };
        Cow::Borrowed(text)
    }

    pub fn status(&self) -> u16 {
        match self {
            Refusal::UriMissing
            | Refusal::InvalidUri
            | Refusal::InvalidRequest
            | Refusal::ConflictingRequest
            | Refusal::ConflictingMetadataId => 400,
            Refusal::UnknownGateway
            | Refusal::DuplicateKey
            | Refusal::NoKey
            | Refusal::InvalidKey => 401,
            Refusal::Forbidden(_) | Refusal::MissingCapability(_) => 403,
            Refusal::RateLimited(_) => 429,
            Refusal::Unavailable => 503,
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
}
