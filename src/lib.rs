//! user-metadata-auth: a forward-auth service for AI/LLM API gateways.
//!
//! `core` decides (pure); `seed` and `config` load what it decides on; `tdl` counts allowed calls per
//! time slot; `http` serves it all; `cli` is what the binary runs.

pub mod clock;
pub mod config;
pub mod core;
pub mod problem;
pub mod seed;
pub mod tdl;
