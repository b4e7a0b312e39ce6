//! The Troop credit ledger, as pure code: no async runtime, no network, no database.
//!
//! Codemap:
//! - [`hash`]: RFC 6962 leaf and node hashes (SHA-256).
//! - [`merkle`]: tree hashes, inclusion and consistency proofs over any
//!   [`merkle::HashReader`] — log arithmetic, separate from storage.
//! - [`tile`]: C2SP tlog-tiles paths, entry bundles, the right-edge
//!   [`tile::TileTree`] and a reader over published tiles.
//! - [`note`]: C2SP signed notes (Ed25519) and tlog-checkpoint bodies.
//! - [`proof`]: `c2sp.org/tlog-proof@v1` inclusion proofs.
//! - [`receipt`]: worker receipts, coordinator countersignatures, batch verification.
//! - [`fold`]: the double-entry fold from events to balances, with its invariants.
//! - [`store`]: the narrow [`store::LogStore`] port, in memory and on disk.
//! - [`store_conformance`]: the suite every `LogStore` adapter passes (memory,
//!   directory, and the cluster's Postgres store in the coordinator).
//! - [`writer`]: append → integrate → publish a signed checkpoint.

#![forbid(unsafe_code)]

pub mod fold;
pub mod hash;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod receipt;
pub mod store;
pub mod store_conformance;
pub mod tile;
pub mod writer;

pub use fold::{FoldError, Ledger};
pub use hash::Hash;
pub use note::{Checkpoint, NoteSigner, NoteVerifier};
pub use writer::LogWriter;
