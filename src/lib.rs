//! user-metadata-auth: a forward-auth service for AI/LLM API gateways.
//!
//! `core` decides (pure, no I/O); `seed` and `config` load what it decides on; `tdl` counts allowed
//! calls per time slot; `http` serves it all; `service` wires the pieces; `cli` is what the binary runs.

pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod http;
pub mod logging;
pub mod lookup;
pub mod metrics;
pub mod problem;
pub mod request_stats;
pub mod seed;
pub mod service;
pub mod store;
pub mod tdl;
