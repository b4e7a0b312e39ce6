//! What workers did, as events and a projection of them: jobs started and
//! failed, and heartbeats summarized per epoch. Money is not here
//! (settlements are ledger entries); this is the record that placement,
//! operators and, later, uptime rewards and audit-by-streak read.
//!
//! Events go through one port, [`HistoryLog`]: publish an event, read the
//! workers' records back. The embedded adapter ([`EmbeddedHistory`]) queues
//! them on the node's event log beside the ledger and folds them in memory;
//! a cluster's (`cluster::history`) produces them to `troop.workers` and
//! `troop.jobs` and projects them into Postgres. Both pass
//! [`conformance`].
//!
//! Nothing waits for these records on a request's path: a crash that loses
//! the last few loses diagnostics, never credits.

pub mod conformance;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use troop_schemas::{JobId, WorkerId};

use crate::domain::heartbeats::EpochSummary;
use crate::eventlog::{EventLog, EventLogError};

/// Event-log tag of worker events (ledger entries 0x01, keys 0x02, bans 0x03).
pub const TAG_WORKER_EVENT: u8 = 0x04;
/// Longest failure reason kept.
const MAX_REASON_BYTES: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerEvent {
    Heartbeats(EpochSummary),
    JobStarted {
        job: JobId,
        worker: WorkerId,
        model: String,
        at_ms: u64,
    },
    JobFailed {
        job: JobId,
        worker: WorkerId,
        reason: String,
        at_ms: u64,
    },
}

impl WorkerEvent {
    pub fn job_failed(job: JobId, worker: WorkerId, reason: &str, at_ms: u64) -> Self {
        let mut end = reason.len().min(MAX_REASON_BYTES);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        WorkerEvent::JobFailed {
            job,
            worker,
            reason: reason[..end].to_owned(),
            at_ms,
        }
    }

    pub fn worker(&self) -> WorkerId {
        match self {
            WorkerEvent::Heartbeats(s) => s.worker,
            WorkerEvent::JobStarted { worker, .. } | WorkerEvent::JobFailed { worker, .. } => {
                *worker
            }
        }
    }

    /// The event a record of [`WorkerEvent::to_record`] holds.
    pub fn from_record(record: &[u8]) -> Result<Self, String> {
        match record.split_first() {
            Some((&TAG_WORKER_EVENT, body)) => {
                serde_json::from_slice(body).map_err(|e| format!("worker event: {e}"))
            }
            _ => Err("not a worker event record".to_owned()),
        }
    }

    pub fn to_record(&self) -> Vec<u8> {
        let mut r = vec![TAG_WORKER_EVENT];
        r.extend(serde_json::to_vec(self).expect("worker events serialize"));
        r
    }
}

/// One worker's record, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub jobs_started: u64,
    pub jobs_failed: u64,
    pub epochs: u64,
    pub beats: u64,
    pub last_seen_ms: u64,
}

/// Every worker's record. One entry per worker ever seen.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHistory {
    workers: HashMap<WorkerId, WorkerRecord>,
}

impl WorkerHistory {
    pub fn apply(&mut self, event: &WorkerEvent) {
        let r = self.workers.entry(event.worker()).or_default();
        match event {
            WorkerEvent::Heartbeats(s) => {
                r.epochs += 1;
                r.beats += u64::from(s.beats);
                r.last_seen_ms = r.last_seen_ms.max(s.last_beat_ms);
            }
            WorkerEvent::JobStarted { at_ms, .. } => {
                r.jobs_started += 1;
                r.last_seen_ms = r.last_seen_ms.max(*at_ms);
            }
            WorkerEvent::JobFailed { at_ms, .. } => {
                r.jobs_failed += 1;
                r.last_seen_ms = r.last_seen_ms.max(*at_ms);
            }
        }
    }

    /// Folds an event-log record if it is a worker event; other records are
    /// not this projection's.
    pub fn apply_record(&mut self, record: &[u8]) -> Result<(), String> {
        if record.first() == Some(&TAG_WORKER_EVENT) {
            self.apply(&WorkerEvent::from_record(record)?);
        }
        Ok(())
    }

    pub fn get(&self, worker: &WorkerId) -> Option<&WorkerRecord> {
        self.workers.get(worker)
    }

    /// Every worker's record: folded over one batch, what a projection adds.
    pub fn iter(&self) -> impl Iterator<Item = (&WorkerId, &WorkerRecord)> {
        self.workers.iter()
    }
}

impl WorkerRecord {
    /// Adds what `more` events folded to: counts add up, the last sighting is
    /// the later one. Folding a batch alone and adding it equals folding it
    /// onto the record (a projection's batches rely on that).
    pub fn add(&mut self, more: &WorkerRecord) {
        self.jobs_started += more.jobs_started;
        self.jobs_failed += more.jobs_failed;
        self.epochs += more.epochs;
        self.beats += more.beats;
        self.last_seen_ms = self.last_seen_ms.max(more.last_seen_ms);
    }
}

/// Most workers one [`HistoryLog::records`] call reads.
pub const MAX_RECORDS_READ: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("event log: {0}")]
    Log(#[from] EventLogError),
    #[error("broker: {0}")]
    Broker(String),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("at most {MAX_RECORDS_READ} workers a read, not {0}")]
    TooMany(usize),
    #[error("worker history as stored: {0}")]
    Stored(String),
}

/// Resolves once the event is durable (on disk, or acknowledged by every
/// in-sync copy of its topic); dropping it does not withdraw the event.
pub type Published = BoxFuture<'static, Result<(), HistoryError>>;
pub type Records = BoxFuture<'static, Result<HashMap<WorkerId, WorkerRecord>, HistoryError>>;

/// Where worker and job events go, and their projection read back.
pub trait HistoryLog: Send + Sync + std::fmt::Debug + 'static {
    /// Queues `event` without waiting for it.
    fn publish(&self, event: &WorkerEvent) -> Published;
    /// The records of `workers` (at most [`MAX_RECORDS_READ`]) as projected
    /// now; a worker with no event has none. A cluster's trail its publishes
    /// by the projector's round.
    fn records(&self, workers: Vec<WorkerId>) -> Records;
}

/// The embedded adapter: records on the node's event log (tag 0x04, beside
/// the ledger; start-up folds them back with the rest, `snapshot`), the
/// projection in memory.
#[derive(Clone)]
pub struct EmbeddedHistory {
    pub events: Arc<dyn EventLog>,
    pub history: Arc<RwLock<WorkerHistory>>,
}

impl std::fmt::Debug for EmbeddedHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedHistory")
    }
}

impl HistoryLog for EmbeddedHistory {
    fn publish(&self, event: &WorkerEvent) -> Published {
        let pending = match self.events.submit(vec![event.to_record()]) {
            Ok(p) => p,
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        };
        // Folded once queued: the log keeps the order, and a record that
        // never reaches the disk is forgotten with the process anyway.
        self.history.write().expect("history lock").apply(event);
        Box::pin(async move { pending.durable().await.map(|_| ()).map_err(Into::into) })
    }

    fn records(&self, workers: Vec<WorkerId>) -> Records {
        if workers.len() > MAX_RECORDS_READ {
            return Box::pin(std::future::ready(Err(HistoryError::TooMany(
                workers.len(),
            ))));
        }
        let history = self.history.read().expect("history lock");
        let found = workers
            .into_iter()
            .filter_map(|w| history.get(&w).map(|r| (w, r.clone())))
            .collect();
        Box::pin(std::future::ready(Ok(found)))
    }
}

/// What the actors hold: events go to the port; a failed publish is logged
/// (nothing is acknowledged on it).
#[derive(Debug, Clone)]
pub struct WorkerEventSink {
    pub log: Arc<dyn HistoryLog>,
}

impl WorkerEventSink {
    pub fn record(&self, event: WorkerEvent) {
        let published = self.log.publish(&event);
        // The embedded log refuses at once, the broker's answer comes later:
        // both are logged, neither is waited for on a request's path.
        if let Some(Err(e)) = futures_util::FutureExt::now_or_never(published) {
            tracing::error!(error = %e, "a worker event could not be logged");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a projection relies on: a batch folded alone and added to the
    /// stored records equals the whole history folded at once, wherever the
    /// batches are cut.
    #[test]
    fn batches_folded_alone_add_up_to_the_whole() {
        let workers = [WorkerId([1; 16]), WorkerId([2; 16])];
        let events: Vec<WorkerEvent> = (0..40u8)
            .map(|i| {
                let worker = workers[usize::from(i % 2)];
                let job = JobId([i; 16]);
                // Times go back and forth, as events from several nodes do.
                let at_ms = u64::from(i.wrapping_mul(37) % 50);
                match i % 3 {
                    0 => WorkerEvent::JobStarted {
                        job,
                        worker,
                        model: "m".into(),
                        at_ms,
                    },
                    1 => WorkerEvent::job_failed(job, worker, "gone", at_ms),
                    _ => WorkerEvent::Heartbeats(EpochSummary {
                        worker,
                        epoch_start_ms: at_ms,
                        epoch_ms: 10,
                        beats: u32::from(i),
                        first_beat_ms: at_ms,
                        last_beat_ms: at_ms,
                        min_free_slots: 0,
                        total_slots: 1,
                        draining: false,
                        models: Vec::new(),
                        gpus: Vec::new(),
                    }),
                }
            })
            .collect();
        let mut whole = WorkerHistory::default();
        for e in &events {
            whole.apply(e);
        }
        for cut in [1, 7, 13, 39] {
            let mut stored: HashMap<WorkerId, WorkerRecord> = HashMap::new();
            for batch in events.chunks(cut) {
                let mut folded = WorkerHistory::default();
                for e in batch {
                    folded.apply(e);
                }
                for (w, more) in folded.iter() {
                    stored.entry(*w).or_default().add(more);
                }
            }
            for w in workers {
                assert_eq!(stored.get(&w), whole.get(&w), "batches of {cut}");
            }
        }
    }

    #[test]
    fn records_round_trip_and_fold() {
        let w = WorkerId([7; 16]);
        let mut h = WorkerHistory::default();
        let started = WorkerEvent::JobStarted {
            job: JobId([1; 16]),
            worker: w,
            model: "m".into(),
            at_ms: 5,
        };
        let failed = WorkerEvent::job_failed(JobId([2; 16]), w, &"é".repeat(400), 9);
        for e in [&started, &failed] {
            h.apply_record(&e.to_record()).expect("folds");
        }
        h.apply_record(&[0x01, b'{', b'}'])
            .expect("a ledger record is not ours");
        assert!(h.apply_record(&[TAG_WORKER_EVENT, b'x']).is_err());
        let r = h.get(&w).expect("seen");
        assert_eq!((r.jobs_started, r.jobs_failed, r.last_seen_ms), (1, 1, 9));
        let WorkerEvent::JobFailed { reason, .. } = failed else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_REASON_BYTES && reason.starts_with('é'));
    }
}
