//! Placement: among the workers serving a model, pick the one that will serve a
//! request soonest, by free slots and measured speed.

use troop_schemas::WorkerId;

/// Speed in milli-tokens per second, as an exponentially weighted moving
/// average of what the coordinator measured itself (never the worker's claim).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Speed {
    milli_tokens_per_s: u64,
    samples: u32,
}

/// Weight of a new observation: 1/8, so one slow request does not sink a worker.
const EWMA_SHIFT: u32 = 3;
/// Assumed for workers not yet measured: new workers get traffic, and so a measurement.
pub const UNMEASURED_MILLI_TOKENS_PER_S: u64 = 20_000;

impl Speed {
    pub fn observe(&mut self, tokens: u64, duration_ms: u64) {
        if tokens == 0 || duration_ms == 0 {
            return;
        }
        let sample = tokens.saturating_mul(1_000_000) / duration_ms;
        self.milli_tokens_per_s = if self.samples == 0 {
            sample
        } else {
            let old = self.milli_tokens_per_s;
            old - (old >> EWMA_SHIFT) + (sample >> EWMA_SHIFT)
        };
        self.samples = self.samples.saturating_add(1);
    }

    pub fn milli_tokens_per_s(&self) -> u64 {
        if self.samples == 0 {
            UNMEASURED_MILLI_TOKENS_PER_S
        } else {
            self.milli_tokens_per_s
        }
    }
}

/// What placement needs to know about one connected worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub worker: WorkerId,
    pub models: Vec<String>,
    pub free_slots: u32,
    pub speed: Speed,
    pub last_heartbeat_ms: u64,
    pub banned: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub model: &'a str,
    /// Workers already tried for this request (retry before the first token).
    pub exclude: &'a [WorkerId],
    pub now_ms: u64,
    /// A worker silent for longer than this is not offered work.
    pub heartbeat_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoWorker {
    /// Nobody serves this model: 404 to the consumer.
    UnknownModel,
    /// Workers serve it, but none can take a job now: 503 with Retry-After.
    NoCapacity,
}

/// Picks the worker with the highest expected throughput for this request:
/// measured speed × free slots (a free slot on a fast worker beats two on a
/// slow one only when the speed gap is wider than 2×). Ties go to the lower
/// worker id, so the choice is deterministic.
pub fn choose<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
    req: &Request<'_>,
) -> Result<WorkerId, NoWorker> {
    let mut serves = false;
    let mut best: Option<(u128, WorkerId)> = None;
    for c in candidates {
        if c.banned || !c.models.iter().any(|m| m == req.model) {
            continue;
        }
        serves = true;
        let fresh = req.now_ms.saturating_sub(c.last_heartbeat_ms) <= req.heartbeat_timeout_ms;
        if !fresh || c.free_slots == 0 || req.exclude.contains(&c.worker) {
            continue;
        }
        let score = u128::from(c.speed.milli_tokens_per_s()) * u128::from(c.free_slots);
        let better = match best {
            None => true,
            Some((s, w)) => score > s || (score == s && c.worker < w),
        };
        if better {
            best = Some((score, c.worker));
        }
    }
    match best {
        Some((_, w)) => Ok(w),
        None if serves => Err(NoWorker::NoCapacity),
        None => Err(NoWorker::UnknownModel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(n: u8, free_slots: u32, speed: u64) -> Candidate {
        let mut s = Speed::default();
        if speed > 0 {
            s.observe(speed, 1_000);
        }
        Candidate {
            worker: WorkerId::derive(&[n]),
            models: vec!["m".into()],
            free_slots,
            speed: s,
            last_heartbeat_ms: 1_000,
            banned: false,
        }
    }

    fn req<'a>(exclude: &'a [WorkerId]) -> Request<'a> {
        Request {
            model: "m",
            exclude,
            now_ms: 5_000,
            heartbeat_timeout_ms: 30_000,
        }
    }

    #[test]
    fn prefers_throughput_then_id() {
        let ws = [cand(1, 1, 50), cand(2, 2, 40), cand(3, 4, 10)];
        assert_eq!(
            choose(&ws, &req(&[])),
            Ok(ws[1].worker),
            "2 × 40 beats 1 × 50 and 4 × 10"
        );
        let tie = [cand(1, 1, 50), cand(2, 1, 50)];
        let lower = tie.iter().map(|c| c.worker).min().expect("two");
        assert_eq!(choose(&tie, &req(&[])), Ok(lower));
    }

    #[test]
    fn skips_full_stale_banned_and_excluded_workers() {
        let mut ws = vec![cand(1, 0, 90), cand(2, 3, 90), cand(3, 3, 10)];
        ws[1].last_heartbeat_ms = 0;
        ws[2].last_heartbeat_ms = 35_000;
        assert_eq!(
            choose(
                &ws,
                &Request {
                    now_ms: 40_000,
                    ..req(&[])
                }
            ),
            Ok(ws[2].worker),
            "stale worker skipped"
        );
        ws[2].banned = true;
        assert_eq!(
            choose(
                &ws,
                &Request {
                    now_ms: 40_000,
                    ..req(&[])
                }
            ),
            Err(NoWorker::NoCapacity)
        );
        let excluded = [ws[2].worker, ws[1].worker];
        ws[2].banned = false;
        assert_eq!(choose(&ws, &req(&excluded)), Err(NoWorker::NoCapacity));
        assert_eq!(
            choose(
                &ws,
                &Request {
                    model: "other",
                    ..req(&[])
                }
            ),
            Err(NoWorker::UnknownModel)
        );
    }

    #[test]
    fn speed_is_a_smoothed_measurement() {
        let mut s = Speed::default();
        assert_eq!(s.milli_tokens_per_s(), UNMEASURED_MILLI_TOKENS_PER_S);
        s.observe(80, 1_000);
        assert_eq!(s.milli_tokens_per_s(), 80_000);
        s.observe(0, 1_000);
        s.observe(10, 0);
        assert_eq!(
            s.milli_tokens_per_s(),
            80_000,
            "empty observations are ignored"
        );
        s.observe(16, 1_000);
        assert_eq!(s.milli_tokens_per_s(), 80_000 - 10_000 + 2_000);
    }
}
