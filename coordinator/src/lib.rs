//! The Troop coordinator.
//!
//! Codemap (growing with issue 3):
//! - [`eventlog`]: the event log port and its embedded adapter (segment files
//!   with checksums, group commit, torn-tail recovery). Kafka comes in issue 4.
//!
//! Still to come: the domain core (holds, placement, pricing), the actors, the
//! OpenAI-compatible API and the worker endpoint.

#![forbid(unsafe_code)]

pub mod eventlog;

pub use troop_ledger as ledger;
