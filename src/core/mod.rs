//! The decision core: everything between "a request head arrived" and "allow with these headers" or
//! "refuse for this reason", with no sockets, files, clocks or Redis.
//!
//! `request` reads the request head, `body` holds `/auth-body`'s JSON body against the entry, `path` and `routes` say which routes apply, `decide` runs the
//! checks, `refusal` names why a call is refused, `model` holds the loaded consumers and entries
//! with their answers prebuilt; `text` and `decimal` are the rules every loaded string and number
//! follows. Adapters around it (`http`, `seed`, `tdl`, `config`) feed it loaded data and carry its
//! answers out; keeping it pure is what lets every SPEC rule be unit-tested without a server.

pub mod body;
pub mod capability;
pub mod decide;
pub mod decimal;
pub mod format;
pub mod intern;
pub mod key;
pub mod limits;
pub mod model;
pub mod path;
pub mod quota;
pub mod refusal;
pub mod request;
pub mod routes;
pub mod text;
pub mod usage;
pub mod window;

pub use decide::{Catalog, Policy, authorize, presented_key};
pub use decimal::Decimal;
pub use key::KeyHash;
pub use model::{Consumer, Entry, EntryFields, METADATA_HEADER_NAMES, MetadataList};
pub use refusal::{BadBody, Forbidden, MAX_USAGE_RECORDS, RateLimitFields, RateLimitedBy, Refusal};
