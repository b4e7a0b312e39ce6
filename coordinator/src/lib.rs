//! The Troop coordinator. Not built yet: issue 3 brings the actors, the
//! OpenAI-compatible API and the embedded event log; this crate only pins the
//! workspace layout and the dependency direction (coordinator → ledger → schemas).

pub use troop_ledger as ledger;
