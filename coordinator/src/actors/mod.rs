//! Actors decide; IO and token bytes flow elsewhere.
//!
//! - [`books::BooksActor`]: the only writer of balances (a sync actor on its own
//!   thread: it fsyncs). Serializing every balance change here is what makes
//!   overdraft impossible under any concurrency.
//! - [`registry::Registry`]: connected workers, their heartbeats and slots, and
//!   placement.

pub mod books;
pub mod registry;
