//! The registry: one entry per connected worker; placement decisions.

use std::collections::HashMap;

use actix::prelude::*;
use troop_schemas::WorkerId;
use troop_schemas::protocol::{EngineKind, GpuInfo, Heartbeat, ModelInfo};

use super::worker::{Goodbye, WorkerLink};
use crate::domain::heartbeats::Summarizer;
use crate::domain::placement::{self, Candidate, NoWorker, Offer, Presence};
use crate::history::{WorkerEvent, WorkerEventSink, WorkerRecord};

#[derive(Debug)]
struct Entry {
    candidate: Candidate,
    models: Vec<ModelInfo>,
    /// From the last heartbeat; self-reported until hardware proofs.
    engine: Option<EngineKind>,
    gpus: Vec<GpuInfo>,
    link: WorkerLink,
    connection: u64,
}

#[derive(Debug)]
pub struct Registry {
    workers: HashMap<WorkerId, Entry>,
    /// What the other nodes of a cluster offer, as last read (empty when
    /// embedded): a request no worker here can take is relayed to one.
    offers: Vec<Offer>,
    /// When `offers` were read (this node's clock, ms): a failed read leaves
    /// them in use until [`placement::OFFERS_VALID_MS`] old.
    offers_read_ms: u64,
    pub heartbeat_timeout_ms: u64,
    summarizer: Summarizer,
    sink: WorkerEventSink,
}

impl Registry {
    pub fn new(heartbeat_timeout_ms: u64, heartbeat_epoch_ms: u64, sink: WorkerEventSink) -> Self {
        Self {
            workers: HashMap::new(),
            offers: Vec::new(),
            offers_read_ms: 0,
            heartbeat_timeout_ms,
            summarizer: Summarizer::new(heartbeat_epoch_ms),
            sink,
        }
    }

    /// Starts the registry on an arbiter (thread) of its own. Why: every
    /// placement, local or relayed here, waits for it, and on the main
    /// arbiter it waited behind the node's background work (BENCHMARKS.md,
    /// cluster TTFT run 7: 0.47 ms to place a local job against 0.04 ms on
    /// the embedded default).
    pub fn start_apart(self) -> Addr<Self> {
        Self::start_in_arbiter(&Arbiter::new().handle(), move |_| self)
    }

    fn offers(&self, now_ms: u64) -> &[Offer] {
        placement::usable_offers(&self.offers, self.offers_read_ms, now_ms)
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// A worker authenticated on a new connection; replaces any older connection
/// of the same worker.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Register {
    pub link: WorkerLink,
    pub connection: u64,
    pub banned: bool,
}

impl Handler<Register> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        let candidate = Candidate {
            worker: msg.link.worker,
            models: Vec::new(),
            free_slots: 0,
            speed: placement::Speed::default(),
            last_heartbeat_ms: 0,
            banned: msg.banned,
        };
        self.workers.insert(
            msg.link.worker,
            Entry {
                candidate,
                models: Vec::new(),
                engine: None,
                gpus: Vec::new(),
                link: msg.link,
                connection: msg.connection,
            },
        );
    }
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub worker: WorkerId,
    pub connection: u64,
}

impl Handler<Unregister> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        if self
            .workers
            .get(&msg.worker)
            .is_some_and(|e| e.connection == msg.connection)
        {
            self.workers.remove(&msg.worker);
            if let Some(last) = self.summarizer.close(&msg.worker) {
                self.sink.record(WorkerEvent::Heartbeats(last));
            }
        }
    }
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Beat {
    pub worker: WorkerId,
    pub heartbeat: Heartbeat,
    /// Jobs the coordinator has given this connection and not yet seen end.
    pub in_flight: u32,
    pub now_ms: u64,
}

impl Handler<Beat> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Beat, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&msg.worker) {
            let h = msg.heartbeat;
            if let Some(closed) = self.summarizer.beat(msg.worker, &h, msg.now_ms) {
                self.sink.record(WorkerEvent::Heartbeats(closed));
            }
            e.candidate.models = h.models.iter().map(|m| m.name.clone()).collect();
            // Slots the coordinator has handed out but the worker has not yet
            // reported busy would be counted twice: trust the lower number.
            let in_flight = msg.in_flight;
            e.candidate.free_slots = if h.draining {
                0
            } else {
                h.free_slots.min(h.total_slots.saturating_sub(in_flight))
            };
            e.candidate.last_heartbeat_ms = msg.now_ms;
            e.models = h.models;
            e.engine = Some(h.engine);
            e.gpus = h.gpus;
        }
    }
}

/// Picks a worker for `model` and takes one of its slots: one of this
/// node's own, or else (when `relay`) another node that offers room.
#[derive(Debug, Message)]
#[rtype(result = "Result<Placed, NoWorker>")]
pub struct Place {
    pub model: String,
    pub exclude: Vec<WorkerId>,
    /// Nodes already tried for this request.
    pub exclude_nodes: Vec<String>,
    /// Whether another node may be chosen (never for a job relayed here:
    /// it would bounce between nodes).
    pub relay: bool,
    pub now_ms: u64,
}

/// Where a job goes.
#[derive(Debug)]
pub enum Placed {
    Local(WorkerLink),
    /// To another node, which places it on one of its workers.
    Remote(Offer),
}

impl Handler<Place> for Registry {
    type Result = Result<Placed, NoWorker>;
    fn handle(&mut self, msg: Place, _: &mut Self::Context) -> Self::Result {
        let req = placement::Request {
            model: &msg.model,
            exclude: &msg.exclude,
            now_ms: msg.now_ms,
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
        };
        let here = match placement::choose(self.workers.values().map(|e| &e.candidate), &req) {
            Ok(chosen) => {
                let e = self.workers.get_mut(&chosen).expect("chosen from the map");
                e.candidate.free_slots = e.candidate.free_slots.saturating_sub(1);
                return Ok(Placed::Local(e.link.clone()));
            }
            Err(e) if !msg.relay => return Err(e),
            Err(e) => e,
        };
        match placement::choose_offer(self.offers(msg.now_ms), &msg.model, &msg.exclude_nodes) {
            Ok(offer) => {
                let offer = offer.clone();
                // Until the node publishes again, count the slot as taken.
                if let Some(o) = self
                    .offers
                    .iter_mut()
                    .find(|o| o.node == offer.node && o.presence.model == offer.presence.model)
                {
                    o.presence.free_slots = o.presence.free_slots.saturating_sub(1);
                }
                Ok(Placed::Remote(offer))
            }
            Err(NoWorker::UnknownModel) => Err(here),
            Err(NoWorker::NoCapacity) => Err(NoWorker::NoCapacity),
        }
    }
}

/// The other nodes' offers, as read at `read_ms`: they replace the last ones.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Offers {
    pub offers: Vec<Offer>,
    pub read_ms: u64,
}

impl Handler<Offers> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Offers, _: &mut Self::Context) {
        self.offers = msg.offers;
        self.offers_read_ms = msg.read_ms;
    }
}

/// What this node's workers offer now, per model, for the other nodes.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Presence>")]
pub struct Present {
    pub now_ms: u64,
}

impl Handler<Present> for Registry {
    type Result = Vec<Presence>;
    fn handle(&mut self, msg: Present, _: &mut Self::Context) -> Self::Result {
        Presence::of(
            self.workers
                .values()
                .map(|e| (&e.candidate, e.models.as_slice())),
            msg.now_ms,
            self.heartbeat_timeout_ms,
        )
    }
}

/// The link to a worker connected here, if it is.
#[derive(Debug, Message)]
#[rtype(result = "Option<WorkerLink>")]
pub struct LinkOf(pub WorkerId);

impl Handler<LinkOf> for Registry {
    type Result = Option<WorkerLink>;
    fn handle(&mut self, msg: LinkOf, _: &mut Self::Context) -> Self::Result {
        self.workers.get(&msg.0).map(|e| e.link.clone())
    }
}

/// A job finished on `worker`: its slot is free again and its speed measured.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Finished {
    pub worker: WorkerId,
    pub tokens: u64,
    pub duration_ms: u64,
}

impl Handler<Finished> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Finished, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&msg.worker) {
            e.candidate.free_slots = e.candidate.free_slots.saturating_add(1);
            e.candidate.speed.observe(msg.tokens, msg.duration_ms);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    pub name: String,
    pub workers: u64,
    pub context_length: Option<u64>,
}

#[derive(Debug, Message)]
#[rtype(result = "Vec<ModelSummary>")]
pub struct Models {
    pub now_ms: u64,
}

impl Handler<Models> for Registry {
    type Result = Vec<ModelSummary>;
    fn handle(&mut self, msg: Models, _: &mut Self::Context) -> Self::Result {
        let mut by_model: std::collections::BTreeMap<String, ModelSummary> =
            std::collections::BTreeMap::new();
        for e in self.workers.values() {
            if e.candidate.banned
                || msg.now_ms.saturating_sub(e.candidate.last_heartbeat_ms)
                    > self.heartbeat_timeout_ms
            {
                continue;
            }
            for m in &e.models {
                let s = by_model.entry(m.name.clone()).or_insert(ModelSummary {
                    name: m.name.clone(),
                    workers: 0,
                    context_length: None,
                });
                s.workers += 1;
                s.context_length = s.context_length.max(m.context_length);
            }
        }
        // Served through another node just the same.
        for o in self.offers(msg.now_ms) {
            let p = &o.presence;
            let s = by_model.entry(p.model.clone()).or_insert(ModelSummary {
                name: p.model.clone(),
                workers: 0,
                context_length: None,
            });
            s.workers += u64::from(p.workers);
            s.context_length = s.context_length.max(p.context_length);
        }
        by_model.into_values().collect()
    }
}

#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Online;

impl Handler<Online> for Registry {
    type Result = usize;
    fn handle(&mut self, _: Online, _: &mut Self::Context) -> usize {
        self.workers.len()
    }
}

/// Bans a worker: it gets no more jobs and its connection is told to go.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Ban(pub WorkerId);

impl Handler<Ban> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Ban, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&msg.0) {
            e.candidate.banned = true;
            e.link.addr.do_send(Goodbye("this worker is banned".into()));
        }
    }
}

/// A connected worker as the admin API lists it (and as a node hands its
/// own to the node that lists the cluster's, `cluster::peers`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerView {
    pub worker: String,
    /// The cluster node it is connected to (`None` when embedded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub models: Vec<String>,
    pub free_slots: u32,
    pub milli_tokens_per_s: u64,
    pub last_heartbeat_ms: u64,
    pub banned: bool,
    /// As the worker's last heartbeat reported them (not yet verified).
    pub engine: Option<EngineKind>,
    pub gpus: Vec<GpuInfo>,
    /// From the history projection (`history::HistoryLog::records`, filled
    /// in by the admin API): jobs started and failed, heartbeat epochs.
    pub history: Option<WorkerRecord>,
}

#[derive(Debug, Message)]
#[rtype(result = "Vec<WorkerView>")]
pub struct ListWorkers;

impl Handler<ListWorkers> for Registry {
    type Result = Vec<WorkerView>;
    fn handle(&mut self, _: ListWorkers, _: &mut Self::Context) -> Self::Result {
        let mut list: Vec<WorkerView> = self
            .workers
            .values()
            .map(|e| WorkerView {
                worker: e.candidate.worker.to_string(),
                node: None,
                models: e.candidate.models.clone(),
                free_slots: e.candidate.free_slots,
                milli_tokens_per_s: e.candidate.speed.milli_tokens_per_s(),
                last_heartbeat_ms: e.candidate.last_heartbeat_ms,
                banned: e.candidate.banned,
                engine: e.engine,
                gpus: e.gpus.clone(),
                history: None,
            })
            .collect();
        list.sort_by(|a, b| a.worker.cmp(&b.worker));
        list
    }
}
