//! Placement: among the workers serving a model, pick the one that will serve a
//! request soonest, by free slots and measured speed.

use troop_schemas::WorkerId;
use troop_schemas::protocol::ModelInfo;

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

/// One node's workers serving one model, as it publishes them for the
/// others: how many, their free slots, the best speed among those with room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub model: String,
    pub workers: u32,
    pub free_slots: u32,
    pub milli_tokens_per_s: u64,
    pub context_length: Option<u64>,
}

impl Presence {
    /// Per model, what `candidates` (each with the models it last reported)
    /// offer now: fresh, unbanned workers only.
    pub fn of<'a>(
        candidates: impl IntoIterator<Item = (&'a Candidate, &'a [ModelInfo])>,
        now_ms: u64,
        heartbeat_timeout_ms: u64,
    ) -> Vec<Presence> {
        let mut by_model: std::collections::BTreeMap<&str, Presence> = Default::default();
        for (c, models) in candidates {
            if c.banned || now_ms.saturating_sub(c.last_heartbeat_ms) > heartbeat_timeout_ms {
                continue;
            }
            for m in models {
                let p = by_model.entry(&m.name).or_insert_with(|| Presence {
                    model: m.name.clone(),
                    workers: 0,
                    free_slots: 0,
                    milli_tokens_per_s: 0,
                    context_length: None,
                });
                p.workers = p.workers.saturating_add(1);
                p.free_slots = p.free_slots.saturating_add(c.free_slots);
                if c.free_slots > 0 {
                    p.milli_tokens_per_s = p.milli_tokens_per_s.max(c.speed.milli_tokens_per_s());
                }
                p.context_length = p.context_length.max(m.context_length);
            }
        }
        by_model.into_values().collect()
    }
}

/// What another node offers for one model, as it last published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub node: String,
    /// Where that node answers internal calls.
    pub internal_url: String,
    pub presence: Presence,
}

/// Expected throughput: measured speed × free slots.
fn score(milli_tokens_per_s: u64, free_slots: u32) -> u128 {
    u128::from(milli_tokens_per_s) * u128::from(free_slots)
}

/// Whether `(score, key)` beats the best so far: higher score, then lower key.
fn beats<K: Ord>(score: u128, key: &K, best: Option<&(u128, K)>) -> bool {
    match best {
        None => true,
        Some((s, k)) => score > *s || (score == *s && key < k),
    }
}

/// How long the other nodes' offers, once read, may be used: a failed read
/// keeps the last ones this long, so a database blip does not make a served
/// model vanish (a stale offer costs one refused relay, then the next node).
pub const OFFERS_VALID_MS: u64 = 3_000;

/// `offers` as read at `read_ms`, or none once they are too old at `now_ms`.
pub fn usable_offers(offers: &[Offer], read_ms: u64, now_ms: u64) -> &[Offer] {
    if now_ms.saturating_sub(read_ms) > OFFERS_VALID_MS {
        &[]
    } else {
        offers
    }
}

/// Picks the other node to relay a request to when no worker here can take
/// it, by the same rule as [`choose`] over the nodes' offers; `exclude`
/// names nodes already tried for this request. Offers are only as fresh as
/// their last publication (about a second): the chosen node places the job
/// on one of its own workers, or says it has no room and the next is tried.
pub fn choose_offer<'a>(
    offers: impl IntoIterator<Item = &'a Offer>,
    model: &str,
    exclude: &[String],
) -> Result<&'a Offer, NoWorker> {
    let mut serves = false;
    let mut best: Option<(u128, &str)> = None;
    let mut chosen = None;
    for o in offers {
        let p = &o.presence;
        if p.model != model {
            continue;
        }
        serves = true;
        if p.free_slots == 0 || exclude.contains(&o.node) {
            continue;
        }
        let s = score(p.milli_tokens_per_s, p.free_slots);
        if beats(s, &o.node.as_str(), best.as_ref()) {
            best = Some((s, o.node.as_str()));
            chosen = Some(o);
        }
    }
    match chosen {
        Some(o) => Ok(o),
        None if serves => Err(NoWorker::NoCapacity),
        None => Err(NoWorker::UnknownModel),
    }
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
        let s = score(c.speed.milli_tokens_per_s(), c.free_slots);
        if beats(s, &c.worker, best.as_ref()) {
            best = Some((s, c.worker));
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

    fn offer(node: &str, free_slots: u32, milli_tokens_per_s: u64) -> Offer {
        Offer {
            node: node.into(),
            internal_url: format!("http://{node}"),
            presence: Presence {
                model: "m".into(),
                workers: 1,
                free_slots,
                milli_tokens_per_s,
                context_length: None,
            },
        }
    }

    #[test]
    fn offers_are_chosen_by_the_same_rule() {
        let offers = [offer("b", 1, 50), offer("c", 2, 40), offer("d", 0, 900)];
        assert_eq!(
            choose_offer(&offers, "m", &[]).map(|o| &o.node),
            Ok(&"c".to_owned())
        );
        assert_eq!(
            choose_offer(&offers, "m", &["c".into()]).map(|o| &o.node),
            Ok(&"b".to_owned()),
            "a node tried already is skipped"
        );
        assert_eq!(
            choose_offer(&offers, "m", &["b".into(), "c".into()]),
            Err(NoWorker::NoCapacity),
            "the full node serves the model but has no room"
        );
        assert_eq!(choose_offer(&offers, "x", &[]), Err(NoWorker::UnknownModel));
        let tie = [offer("z", 1, 10), offer("y", 1, 10)];
        assert_eq!(
            choose_offer(&tie, "m", &[]).map(|o| &o.node),
            Ok(&"y".to_owned())
        );
    }

    #[test]
    fn offers_are_used_until_too_old() {
        let offers = [offer("b", 1, 50)];
        assert_eq!(usable_offers(&offers, 10_000, 10_000).len(), 1);
        assert_eq!(
            usable_offers(&offers, 10_000, 10_000 + OFFERS_VALID_MS).len(),
            1,
            "a read that failed since leaves them in use"
        );
        assert!(usable_offers(&offers, 10_000, 10_001 + OFFERS_VALID_MS).is_empty());
        assert_eq!(
            usable_offers(&offers, 10_000, 9_000).len(),
            1,
            "a clock step back does not drop them"
        );
    }

    #[test]
    fn presence_sums_fresh_workers_per_model() {
        let mut ws = [
            cand(1, 2, 30),
            cand(2, 0, 90),
            cand(3, 5, 10),
            cand(4, 1, 10),
        ];
        ws[2].banned = true;
        ws[3].last_heartbeat_ms = 0;
        let model = |name: &str, context_length| ModelInfo {
            name: name.into(),
            context_length,
        };
        let models = [
            vec![model("m", Some(4096))],
            vec![model("m", Some(8192)), model("n", Some(8192))],
            vec![model("m", None)],
            vec![model("m", None)],
        ];
        let reported = ws.iter().zip(models.iter().map(Vec::as_slice));
        assert_eq!(
            Presence::of(reported, 5_000, 4_500),
            vec![
                Presence {
                    model: "m".into(),
                    workers: 2,
                    free_slots: 2,
                    milli_tokens_per_s: 30_000,
                    context_length: Some(8192),
                },
                Presence {
                    model: "n".into(),
                    workers: 1,
                    free_slots: 0,
                    milli_tokens_per_s: 0,
                    context_length: Some(8192),
                },
            ],
            "banned and silent workers are not offered; a full one counts, without its speed"
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
