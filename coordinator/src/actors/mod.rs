//! Actors decide; IO and token bytes flow elsewhere.
//!
//! - [`account::AccountActor`]: one per active account: its request allowance
//!   (rate and in-flight limits) and the one door, in order, through which its
//!   spending (holds, their settlement or voiding) reaches the books, judged
//!   on this actor's thread ([`crate::embedded::Embedded`], one short lock
//!   for every account: one order of every ledger event, which is what makes
//!   overdraft impossible under any concurrency).
//! - [`registry::Registry`]: the scheduler: connected workers, their heartbeats
//!   and slots, and placement.
//! - [`worker::WorkerActor`]: one per worker connection: its jobs (slots and
//!   ends), cancels, heartbeats; the connection's read loop puts output bytes
//!   into each job's bounded channel without passing through it.
//! - [`session::Session`]: one per consumer request: hold, placement and
//!   retries, then settlement once the HTTP response has streamed the output.

pub mod account;
pub mod registry;
pub mod session;
pub mod worker;
