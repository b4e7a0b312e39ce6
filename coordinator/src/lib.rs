//! The Troop coordinator.
//!
//! Codemap:
//! - [`server`]: actix-web: the OpenAI-compatible API (`consumer`), the worker
//!   WebSocket (`worker`), `/admin`, `/ledger`, `/metrics`; [`server::spawn`]
//!   embeds a coordinator in a thread.
//! - [`actors`]: one actor per active account, per worker connection and per
//!   request, and the registry of connected workers (placement).
//! - [`books`]: balances as a projection of the event log, published as the
//!   signed ledger (judging apart from integration).
//! - [`embedded`]: the embedded books behind the money and reads ports: one
//!   judge behind a short lock, taken on the asking actor's thread.
//! - [`money`]: the port through which balance changes reach the books (the
//!   embedded books, or a cluster's partition owners), and its conformance suite.
//! - [`reads`]: the port through which the API reads the books (accounts,
//!   workers, receipts with proofs, `/ledger/`): the embedded books, or a
//!   cluster's Postgres projection; its conformance suite.
//! - [`history`]: worker events (jobs started and failed, heartbeat summaries),
//!   their fold, the `HistoryLog` port (publish; read workers' records), its
//!   embedded adapter and conformance suite.
//! - [`keys`]: API keys, event-sourced; [`directory`]: key and ban records,
//!   which share a home's log with its ledger entries.
//! - [`snapshot`]: every projection at one offset, so start-up replays only
//!   what came after; a background snapshotter keeps them fresh.
//! - [`domain`]: pure decisions — placement, hold sizing, billing, rate limits,
//!   heartbeat summaries.
//! - [`eventlog`]: the event log port and its embedded adapter (segment files
//!   with checksums, group commit, torn-tail recovery).
//! - [`cluster`]: Kafka and Postgres for a cluster of nodes (CLUSTER.md):
//!   `migrate`, the Kafka event log, the ledger's sequencer and its projection,
//!   `replay`, partition ownership and the owners' judgement of balance
//!   changes (`owner`, `owned`, the internal API), reads from Postgres
//!   (`reads`), worker history on its topics projected into Postgres
//!   (`history`), a node's `/ledger/` and `/metrics`.
//! - [`api`]: OpenAI request validation and error shapes; [`config`]; [`metrics`].

#![forbid(unsafe_code)]

pub mod actors;
pub mod api;
pub mod books;
pub mod cluster;
pub mod config;
pub mod directory;
pub mod domain;
pub mod embedded;
pub mod eventlog;
pub mod history;
pub mod keys;
pub mod metrics;
pub mod money;
pub mod reads;

pub use troop_ledger as ledger;
pub mod server;
pub mod snapshot;
