//! Wire types shared by every Troop component.
//!
//! - [`types`]: newtype ids (`acct_…`, `wrk_…`, `job_…`, `hold_…`), keys,
//!   signatures, BLAKE3 digests and [`CreditsMicro`] amounts.
//! - [`canonical`]: RFC 8785 canonical JSON, integers only.
//! - [`event`]: the versioned ledger events and their entry encoding.
//! - [`protocol`]: the worker ↔ coordinator WebSocket messages and data frames.
//! - [`sse`]: the stream meter — counting what an OpenAI event stream delivered.
//! - [`receipt`]: worker receipts and coordinator countersignatures (wire form
//!   and the bytes each party signs).
//!
//! `LEDGER.md` beside this crate documents every kind and field; `json/` holds
//! the JSON Schemas and `fixtures/` the golden entries of each version.

pub mod canonical;
pub mod event;
pub mod protocol;
pub mod receipt;
pub mod sse;
pub mod types;

pub use event::{
    AccountRole, ENTRY_VERSION, EntryError, Event, KeyRole, MAX_ENTRY_BYTES, ModelPrice,
    VoidReason, decode_entry, decode_entry_spans, encode_entry,
};
pub use receipt::{CountersignedReceipt, Receipt};
pub use types::{
    AccountId, ApiKeyId, CreditsMicro, Digest, HoldId, JobId, ParseError, PublicKey, Signature,
    WorkerId,
};
