//! One actor per worker connection: its jobs, its control messages, its
//! capacity as it reports it.
//!
//! The connection's read loop (server/worker.rs) sends the actor the worker's
//! control messages and puts output bytes straight into each job's bounded
//! channel, found in the [`JobTable`] the actor keeps. The actor is the only one
//! that adds or removes jobs there, so a job's slot, its end and the worker's
//! slot count change in one place, in one order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use troop_schemas::protocol::{CoordinatorMsg, WorkerMsg};
use troop_schemas::{JobId, WorkerId};

use super::registry::{Beat, Registry, Unregister};

/// How a job ends, as the worker says (also on the wire between nodes,
/// cluster::relay).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobEnd {
    Done {
        usage: Option<troop_schemas::protocol::EngineUsage>,
        receipt: Box<troop_schemas::Receipt>,
        worker_sig: troop_schemas::Signature,
    },
    Failed {
        status: u16,
        error: String,
    },
    /// The worker's connection went away.
    Lost,
}

/// A job in flight on one worker connection: where its bytes go (the data
/// plane: a bounded channel, never an actor mailbox) and who hears how it ended.
#[derive(Debug)]
pub struct JobSlot {
    pub data: mpsc::Sender<Bytes>,
    pub end: oneshot::Sender<JobEnd>,
}

/// The jobs of one connection. The [`WorkerActor`] inserts and removes; the
/// read loop looks up where a job's bytes go, and drops a job whose consumer
/// stopped reading (so that its next frames do not wait again).
pub type JobTable = Arc<Mutex<HashMap<JobId, JobSlot>>>;

/// Connection numbers: a reconnecting worker's new connection replaces its
/// old one in the registry, and the old one's late goodbye must not remove it.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// What the registry and sessions hold to reach a worker.
#[derive(Debug, Clone)]
pub struct WorkerLink {
    pub worker: WorkerId,
    pub addr: Addr<WorkerActor>,
}

#[derive(Debug)]
pub struct WorkerActor {
    worker: WorkerId,
    connection: u64,
    /// Control messages to the worker, written by the connection's writer task.
    outbox: mpsc::Sender<CoordinatorMsg>,
    jobs: JobTable,
    registry: Addr<Registry>,
}

impl WorkerActor {
    pub fn new(
        worker: WorkerId,
        outbox: mpsc::Sender<CoordinatorMsg>,
        jobs: JobTable,
        registry: Addr<Registry>,
    ) -> Self {
        Self {
            worker,
            connection: CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1,
            outbox,
            jobs,
            registry,
        }
    }

    pub fn connection(&self) -> u64 {
        self.connection
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, JobSlot>> {
        self.jobs.lock().expect("jobs lock")
    }

    fn end(&self, job: JobId, end: JobEnd) {
        if let Some(slot) = self.jobs().remove(&job) {
            let _ = slot.end.send(end);
        }
    }
}

impl Actor for WorkerActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        // Every job still here learns its worker is gone; their sessions settle.
        let orphans: Vec<_> = self.jobs().drain().collect();
        for (_, slot) in orphans {
            let _ = slot.end.send(JobEnd::Lost);
        }
        self.registry.do_send(Unregister {
            worker: self.worker,
            connection: self.connection,
        });
    }
}

/// Gives the worker a job: its slot goes into the table before the job goes
/// out, so that no output can arrive for a job the table does not know. Sent
/// without waiting: a worker whose outbox is full (it is far behind) fails
/// the job through its end, and the session tries another worker.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Assign {
    pub job: JobId,
    pub slot: JobSlot,
    pub msg: CoordinatorMsg,
}

impl Handler<Assign> for WorkerActor {
    type Result = ();
    fn handle(&mut self, msg: Assign, _: &mut Self::Context) {
        self.jobs().insert(msg.job, msg.slot);
        if self.outbox.try_send(msg.msg).is_err() {
            self.end(
                msg.job,
                JobEnd::Failed {
                    status: 503,
                    error: "the worker is too far behind to take a job".into(),
                },
            );
        }
    }
}

/// Tells the worker to stop a job. Its slot stays, so that the receipt for
/// what it streamed still reaches the session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Cancel(pub JobId);

impl Handler<Cancel> for WorkerActor {
    type Result = ();
    fn handle(&mut self, msg: Cancel, _: &mut Self::Context) {
        let _ = self.outbox.try_send(CoordinatorMsg::Cancel { job: msg.0 });
    }
}

/// Forgets a job: its session is done with it (settled, or moved on to
/// another worker after cancelling it here).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Release(pub JobId);

impl Handler<Release> for WorkerActor {
    type Result = ();
    fn handle(&mut self, msg: Release, _: &mut Self::Context) {
        self.jobs().remove(&msg.0);
    }
}

/// A control message from the worker (output bytes never come this way).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Control {
    pub msg: WorkerMsg,
    pub now_ms: u64,
}

impl Handler<Control> for WorkerActor {
    type Result = ();
    fn handle(&mut self, msg: Control, _: &mut Self::Context) {
        match msg.msg {
            WorkerMsg::Heartbeat(heartbeat) => {
                let in_flight = u32::try_from(self.jobs().len()).unwrap_or(u32::MAX);
                self.registry.do_send(Beat {
                    worker: self.worker,
                    heartbeat,
                    in_flight,
                    now_ms: msg.now_ms,
                });
            }
            WorkerMsg::JobStarted { .. } => {}
            WorkerMsg::JobDone {
                job,
                usage,
                receipt,
                worker_sig,
            } => self.end(
                job,
                JobEnd::Done {
                    usage,
                    receipt,
                    worker_sig,
                },
            ),
            WorkerMsg::JobFailed { job, status, error } => {
                self.end(job, JobEnd::Failed { status, error });
            }
            // The read loop ends a connection that sends these after its handshake.
            WorkerMsg::Hello { .. } | WorkerMsg::Auth { .. } => {}
        }
    }
}

/// Asks the worker to go (it is banned); the connection closes after.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Goodbye(pub String);

impl Handler<Goodbye> for WorkerActor {
    type Result = ();
    fn handle(&mut self, msg: Goodbye, _: &mut Self::Context) {
        let _ = self
            .outbox
            .try_send(CoordinatorMsg::Goodbye { reason: msg.0 });
    }
}

/// The connection ended.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Disconnected;

impl Handler<Disconnected> for WorkerActor {
    type Result = ();
    fn handle(&mut self, _: Disconnected, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
