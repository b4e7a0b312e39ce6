//! The event log port: the coordinator's source of truth. Every decision
//! (heartbeat summary, hold, completion, receipt) is appended here and is
//! acknowledged only once durable; every projection is rebuilt by reading it.
//!
//! Adapters: [`file::FileLog`] (the embedded default: segment files on local
//! disk) and, later, Kafka. Both must pass [`conformance`].

pub mod file;

/// Compiled always (it is small) so that every adapter's tests, in any crate,
/// run the same suite.
pub mod conformance;

/// Largest record accepted: an event is a few KB; this bounds a torn or
/// garbage length prefix from making recovery read gigabytes.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    RecordTooLarge(usize),
    #[error("event log I/O at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("event log is corrupt at {path} byte {at}: {why}")]
    Corrupt {
        path: String,
        at: u64,
        why: &'static str,
    },
    #[error("event log is closed")]
    Closed,
}

/// One stored record and its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// An append-only, totally ordered log of opaque records.
pub trait EventLog: Send + Sync {
    /// Appends `records` in order and returns the offset of the first once all
    /// are durable. Concurrent callers are committed together (group commit).
    fn append(&self, records: Vec<Vec<u8>>) -> Result<u64, EventLogError>;

    /// Up to `max_records` records from `from` on (fewer at the end of the log).
    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, EventLogError>;

    /// The offset the next record will get: the number of durable records.
    fn next_offset(&self) -> u64;
}
