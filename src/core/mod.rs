//! The decision core: everything between "a request head arrived" and "allow with these headers" or
//! "deny with this reason", with no sockets, files, clocks or Redis.
//!
//! Adapters around it (`http`, `seed`, `tdl`, `config`) feed it loaded data and carry its answers out;
//! keeping it pure is what lets every SPEC rule be unit-tested without a server.

pub mod decide;
pub mod format;
pub mod intern;
pub mod key;
pub mod model;
pub mod path;
pub mod request;
pub mod routes;

pub use decide::{Catalog, Deny, Policy, authorize, presented_key};
pub use key::KeyHash;
pub use model::{Consumer, Entry, EntryFields, METADATA_HEADER_NAMES, MetadataList};
