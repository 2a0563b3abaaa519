//! user-metadata-auth: a forward-auth service for AI/LLM API gateways.
//!
//! # Layout
//!
//! - `core` decides, with no I/O: it reads the original request, matches routes and Kong plugins,
//!   and turns key → consumer → entry into an allow (with prebuilt headers) or a `Refusal`.
//! - `seed` and `config` load what it decides on, reporting every problem with its place; `problem`
//!   is that report.
//! - `lookup` finds a key's consumer (in-process cache, Redis, seed); `store` is all Redis I/O.
//! - `tdl` counts allowed calls per time slot, exactly once; `clock` is its injectable time source.
//! - `http` serves it all (connections in `http::conn`, answers in `http::answer`); `metrics` and
//!   `request_stats` are what Prometheus scrapes; `logging` sets up tracing.
//! - `usage` keeps what `POST /usage` records (exact sums, once per request id) and the budgets
//!   `/auth` checks against them; `quota` keeps the request limits.
//! - `tokenizer` counts `/auth-body`'s input tokens (o200k_base) in linear time.
//! - `admin` changes consumers and keys at runtime (operator records in Redis, audited, published
//!   on the invalidation channel every replica's `lookup` listens to) and exports billing;
//!   `http::admin` is its listener.
//! - `reload` replaces the running seed on SIGHUP, `POST /admin/reload` and seed file changes.
//! - `service` wires the pieces; `cli` is what the binary runs.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod http;
pub mod logging;
pub mod lookup;
pub mod metrics;
pub mod problem;
pub mod quota;
pub mod reload;
pub mod request_stats;
pub mod seed;
pub mod service;
pub mod store;
pub mod tdl;
pub mod tokenizer;
pub mod usage;
