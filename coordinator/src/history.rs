//! What workers did, as events in the event log and a projection of them:
//! jobs started and failed, and heartbeats summarized per epoch. Money is not
//! here (settlements are ledger entries); this is the record that placement,
//! operators and, later, uptime rewards and audit-by-streak read.
//!
//! These records are queued without waiting for their fsync: nothing is
//! acknowledged on them, and a crash that loses the last few loses diagnostics,
//! never credits.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use troop_schemas::{JobId, WorkerId};

use crate::domain::heartbeats::EpochSummary;
use crate::eventlog::EventLog;

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
        if let Some((&TAG_WORKER_EVENT, body)) = record.split_first() {
            let event: WorkerEvent =
                serde_json::from_slice(body).map_err(|e| format!("worker event: {e}"))?;
            self.apply(&event);
        }
        Ok(())
    }

    pub fn get(&self, worker: &WorkerId) -> Option<&WorkerRecord> {
        self.workers.get(worker)
    }
}

/// Where worker events go: queued on the event log, folded into the history.
#[derive(Clone)]
pub struct WorkerEventSink {
    pub events: Arc<dyn EventLog>,
    pub history: Arc<RwLock<WorkerHistory>>,
}

impl std::fmt::Debug for WorkerEventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerEventSink")
    }
}

impl WorkerEventSink {
    pub fn record(&self, event: WorkerEvent) {
        if let Err(e) = self.events.submit(vec![event.to_record()]) {
            tracing::error!(error = %e, "a worker event could not be logged");
            return;
        }
        self.history.write().expect("history lock").apply(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
