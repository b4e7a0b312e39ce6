//! Heartbeats summarized per worker per epoch: the event log gets one record
//! per worker per epoch (default a minute), not one per heartbeat, and still
//! says when each worker was up, with what capacity and models. Pure: time is
//! an argument. Uptime rewards will be computed from these summaries.

use std::collections::HashMap;

use troop_schemas::WorkerId;
use troop_schemas::protocol::Heartbeat;

/// One worker's heartbeats within one epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochSummary {
    pub worker: WorkerId,
    /// Start of the epoch: a multiple of the epoch length.
    pub epoch_start_ms: u64,
    pub epoch_ms: u64,
    pub beats: u32,
    pub first_beat_ms: u64,
    pub last_beat_ms: u64,
    /// Fewest free slots reported: how busy it got.
    pub min_free_slots: u32,
    pub total_slots: u32,
    /// Any heartbeat said it was draining.
    pub draining: bool,
    /// Models in the last heartbeat.
    pub models: Vec<String>,
    /// GPU names in the last heartbeat (self-reported until hardware proofs).
    pub gpus: Vec<String>,
}

#[derive(Debug)]
pub struct Summarizer {
    epoch_ms: u64,
    open: HashMap<WorkerId, EpochSummary>,
}

impl Summarizer {
    pub fn new(epoch_ms: u64) -> Self {
        assert!(epoch_ms > 0, "an epoch has a length");
        Self {
            epoch_ms,
            open: HashMap::new(),
        }
    }

    /// Adds a heartbeat; returns the worker's previous epoch once a heartbeat
    /// falls in a later one.
    pub fn beat(&mut self, worker: WorkerId, h: &Heartbeat, now_ms: u64) -> Option<EpochSummary> {
        let epoch_start_ms = now_ms - now_ms % self.epoch_ms;
        let models: Vec<String> = h.models.iter().map(|m| m.name.clone()).collect();
        let gpus: Vec<String> = h.gpus.iter().map(|g| g.name.clone()).collect();
        let closed = match self.open.get(&worker) {
            Some(s) if s.epoch_start_ms < epoch_start_ms => self.open.remove(&worker),
            _ => None,
        };
        let s = self.open.entry(worker).or_insert_with(|| EpochSummary {
            worker,
            epoch_start_ms,
            epoch_ms: self.epoch_ms,
            beats: 0,
            first_beat_ms: now_ms,
            last_beat_ms: now_ms,
            min_free_slots: h.free_slots,
            total_slots: h.total_slots,
            draining: false,
            models: Vec::new(),
            gpus: Vec::new(),
        });
        s.beats = s.beats.saturating_add(1);
        s.last_beat_ms = s.last_beat_ms.max(now_ms);
        s.min_free_slots = s.min_free_slots.min(h.free_slots);
        s.total_slots = h.total_slots;
        s.draining |= h.draining;
        s.models = models;
        s.gpus = gpus;
        closed
    }

    /// The worker left: its open epoch, if any, is final.
    pub fn close(&mut self, worker: &WorkerId) -> Option<EpochSummary> {
        self.open.remove(worker)
    }

    /// Workers with an open epoch (one entry per connected worker at most).
    pub fn open_epochs(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use troop_schemas::protocol::{EngineKind, ModelInfo};

    fn hb(free: u32) -> Heartbeat {
        Heartbeat {
            engine: EngineKind::LlamaCpp,
            models: vec![ModelInfo {
                name: "m".into(),
                context_length: None,
            }],
            gpus: vec![],
            free_slots: free,
            total_slots: 4,
            draining: false,
        }
    }

    #[test]
    fn one_summary_per_worker_per_epoch() {
        let w = WorkerId([1; 16]);
        let mut s = Summarizer::new(60_000);
        assert_eq!(s.beat(w, &hb(4), 60_000), None);
        assert_eq!(s.beat(w, &hb(1), 70_000), None);
        assert_eq!(s.beat(w, &hb(3), 119_999), None);
        let closed = s.beat(w, &hb(4), 120_000).expect("the first epoch closes");
        assert_eq!(
            (
                closed.epoch_start_ms,
                closed.beats,
                closed.first_beat_ms,
                closed.last_beat_ms,
                closed.min_free_slots
            ),
            (60_000, 3, 60_000, 119_999, 1)
        );
        assert_eq!(closed.models, vec!["m".to_owned()]);
        let last = s.close(&w).expect("open epoch");
        assert_eq!((last.epoch_start_ms, last.beats), (120_000, 1));
        assert_eq!(s.open_epochs(), 0);
        assert_eq!(s.close(&w), None);
    }

    #[test]
    fn workers_are_summarized_apart() {
        let (a, b) = (WorkerId([1; 16]), WorkerId([2; 16]));
        let mut s = Summarizer::new(1_000);
        s.beat(a, &hb(4), 0);
        s.beat(b, &hb(4), 500);
        assert!(s.beat(a, &hb(4), 1_000).is_some());
        assert_eq!(s.open_epochs(), 2);
        assert!(
            s.beat(b, &hb(4), 999).is_none(),
            "a late beat stays in its epoch"
        );
    }
}
