//! The coordinator's pure domain logic: no IO, time passed in as an argument,
//! tested deterministically. Actors call these to decide; they do the IO.
//!
//! - [`placement`]: which worker serves a request.
//! - [`meter`]: counting what an engine stream actually delivered.
//! - [`billing`]: how much to hold before a job, and what to bill after it,
//!   from the coordinator's own counts rather than the worker's word.

pub mod billing;
pub mod placement;
