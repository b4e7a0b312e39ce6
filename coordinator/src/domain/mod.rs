//! The coordinator's pure domain logic: no IO, time passed in as an argument,
//! tested deterministically. Actors call these to decide; they do the IO.
//!
//! - [`placement`]: which worker serves a request.
//! - counting what an engine stream delivered lives in `troop_schemas::sse`,
//!   shared with the agent and the load tester.
//! - [`heartbeats`]: heartbeats summarized per worker per epoch.
//! - [`ratelimit`]: requests per minute and in flight, per account.
//! - [`liveness`]: which coordinator nodes are gone, so that their
//!   requests' holds are voided.
//! - [`billing`]: how much to hold before a job, and what to bill after it,
//!   from the coordinator's own counts rather than the worker's word.

pub mod billing;
pub mod heartbeats;
pub mod liveness;
pub mod placement;
pub mod ratelimit;
