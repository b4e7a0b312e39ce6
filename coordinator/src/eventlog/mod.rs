//! The event log port: the coordinator's source of truth. Every decision
//! (heartbeat summary, hold, completion, receipt) is appended here and is
//! acknowledged only once durable; every projection is rebuilt by reading it.
//!
//! Adapters: [`file::FileLog`] (the embedded default: segment files on local
//! disk) and [`crate::cluster::kafka_log::KafkaLog`] (one Kafka partition).
//! Both pass [`conformance`].

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
    #[error("event log broker: {0}")]
    Broker(String),
}

/// One stored record and its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// An append that was queued but is not known to be durable yet. Its offsets
/// are fixed when it is queued; whoever acknowledges its effect waits first.
#[derive(Debug)]
pub struct Pending {
    /// Offset of the first record.
    pub first: u64,
    /// Records in the append.
    pub count: u64,
    durable: tokio::sync::oneshot::Receiver<Result<u64, EventLogError>>,
}

impl Pending {
    pub fn new(
        first: u64,
        count: u64,
        durable: tokio::sync::oneshot::Receiver<Result<u64, EventLogError>>,
    ) -> Self {
        Self {
            first,
            count,
            durable,
        }
    }

    /// Waits, blocking the thread, until the records are durable. Request
    /// handlers use [`Pending::durable`]; this is for start-up and sync code.
    pub fn wait(self) -> Result<u64, EventLogError> {
        let rx = self.durable;
        let recv = move || rx.blocking_recv().map_err(|_| EventLogError::Closed);
        // tokio refuses to block a thread that drives a runtime (start-up runs
        // on one), so wait from a plain thread there.
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(recv).join().map_err(|_| EventLogError::Closed)?)?
        } else {
            recv()?
        }
    }

    /// Resolves once the records are durable.
    pub async fn durable(self) -> Result<u64, EventLogError> {
        self.durable.await.map_err(|_| EventLogError::Closed)?
    }
}

/// An append-only, totally ordered log of opaque records.
pub trait EventLog: Send + Sync {
    /// Queues `records` behind every earlier append and returns at once with
    /// their offsets; they are durable when the [`Pending`] resolves. Appends
    /// queued while the log is busy are made durable together (group commit),
    /// so callers that do not wait on each other share one fsync.
    fn submit(&self, records: Vec<Vec<u8>>) -> Result<Pending, EventLogError>;

    /// Appends `records` in order and returns the offset of the first once all
    /// are durable. Blocks the thread: never call it from async code.
    fn append(&self, records: Vec<Vec<u8>>) -> Result<u64, EventLogError> {
        self.submit(records)?.wait()
    }

    /// Up to `max_records` records from `from` on (fewer at the end of the log).
    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, EventLogError>;

    /// The offset the next record will get: the number of durable records.
    fn next_offset(&self) -> u64;
}
