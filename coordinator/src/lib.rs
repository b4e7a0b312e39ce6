//! The Troop coordinator.
//!
//! Codemap (growing with issue 3):
//! - [`api`]: the OpenAI-compatible API (validation and error shapes so far).
//! - [`books`]: balances as a projection of the event log, published as the signed ledger.
//! - [`domain`]: pure decisions — placement, hold sizing, billing.
//! - [`eventlog`]: the event log port and its embedded adapter (segment files
//!   with checksums, group commit, torn-tail recovery). Kafka comes in issue 4.
//!
//! Still to come: the actors, the OpenAI-compatible API and the worker endpoint.

#![forbid(unsafe_code)]

pub mod actors;
pub mod api;
pub mod books;
pub mod config;
pub mod domain;
pub mod eventlog;
pub mod keys;
pub mod metrics;

pub use troop_ledger as ledger;
pub mod server;
