//! The agent's outbound WebSocket to the coordinator: handshake, heartbeats,
//! jobs run against the engine with their output forwarded as data frames,
//! and a signed receipt per job. Reconnects with jittered backoff, to the
//! next coordinator of its list (a cluster's nodes): a worker whose node dies
//! is back on another one within a second or so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use ed25519_dalek::Signer as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use troop_schemas::protocol::{self, CoordinatorMsg, DataFrame, EngineUsage, Heartbeat, WorkerMsg};
use troop_schemas::sse::Meter;
use troop_schemas::{Digest, JobId, PublicKey, Receipt, Signature};

use crate::engine::Engine;
use crate::gpu;
use crate::identity::Identity;

/// Where heartbeats get their GPU facts.
#[derive(Debug, Clone)]
pub enum GpuSource {
    /// Ask `nvidia-smi` at every heartbeat (utilization and temperature move).
    Detect,
    /// Fixed facts: simulated workers in load tests, which must not spawn a
    /// process per heartbeat.
    Fixed(Vec<troop_schemas::protocol::GpuInfo>),
}

/// Frames queued toward the coordinator; a full queue slows the engine reads.
const OUTBOX: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most of an engine's error body kept for the coordinator.
const MAX_ERROR_BYTES: usize = 1024;

/// Coordinators an agent may be given: more is a misconfiguration.
pub const MAX_COORDINATORS: usize = 64;

#[derive(Debug)]
pub struct Agent {
    /// Base URLs of the coordinator's nodes, tried in turn.
    pub coordinators: Vec<String>,
    /// The one the next session connects to (an index into `coordinators`).
    next_coordinator: AtomicUsize,
    pub engine: Engine,
    pub identity: Identity,
    pub slots: u32,
    pub http: reqwest::Client,
    pub gpus: GpuSource,
    active: AtomicU32,
    draining: AtomicBool,
}

impl Agent {
    pub fn new(
        coordinators: Vec<String>,
        engine: Engine,
        identity: Identity,
        slots: u32,
    ) -> Arc<Self> {
        Self::with(
            coordinators,
            engine,
            identity,
            slots,
            GpuSource::Detect,
            engine_client(),
        )
    }

    /// An agent with its GPU facts and HTTP client given (many simulated
    /// agents in one process share one client).
    ///
    /// Panics on no coordinator or more than [`MAX_COORDINATORS`]: callers
    /// check what users give them first.
    pub fn with(
        coordinators: Vec<String>,
        engine: Engine,
        identity: Identity,
        slots: u32,
        gpus: GpuSource,
        http: reqwest::Client,
    ) -> Arc<Self> {
        assert!(
            (1..=MAX_COORDINATORS).contains(&coordinators.len()),
            "an agent needs 1 to {MAX_COORDINATORS} coordinators"
        );
        Arc::new(Self {
            coordinators,
            next_coordinator: AtomicUsize::new(0),
            engine,
            identity,
            slots,
            http,
            gpus,
            active: AtomicU32::new(0),
            draining: AtomicBool::new(false),
        })
    }

    /// The coordinator the next session connects to.
    fn coordinator(&self) -> &str {
        let i = self.next_coordinator.load(Ordering::SeqCst) % self.coordinators.len();
        &self.coordinators[i]
    }

    /// After a session ends: the next one goes to the next coordinator (the
    /// one just left may be the one that died). True when that starts the
    /// list over: every coordinator was tried since the last time.
    fn move_on(&self) -> bool {
        let before = self.next_coordinator.fetch_add(1, Ordering::SeqCst);
        (before + 1).is_multiple_of(self.coordinators.len())
    }

    fn heartbeat(&self) -> Heartbeat {
        let gpus = match &self.gpus {
            GpuSource::Fixed(g) => g.clone(),
            GpuSource::Detect => match gpu::detect(None) {
                gpu::Detection::Gpus(g) => g,
                gpu::Detection::CpuOnly(_) => Vec::new(),
            },
        };
        let active = self.active.load(Ordering::SeqCst);
        Heartbeat {
            engine: self.engine.kind,
            models: self.engine.models.clone(),
            gpus,
            free_slots: self.slots.saturating_sub(active),
            total_slots: self.slots,
            draining: self.draining.load(Ordering::SeqCst),
        }
    }

    pub fn active_jobs(&self) -> u32 {
        self.active.load(Ordering::SeqCst)
    }
}

/// The WebSocket URL of a coordinator's base URL (http → ws, https → wss).
fn ws_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = base
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| base.strip_prefix("https://").map(|r| format!("wss://{r}")));
    format!("{}/worker", ws.unwrap_or_else(|| base.to_owned()))
}

/// The client an agent talks to its engine with.
pub fn engine_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // One connection per job: engines (llama.cpp among them) close idle
        // keep-alive connections, and a job sent on one that is closing
        // would fail for no fault of the engine.
        .pool_max_idle_per_host(0)
        .build()
        .expect("static client settings")
}

/// Serves until `shutdown` turns true, then drains: takes no new jobs, finishes
/// the running ones, and returns.
pub async fn run(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = std::time::Instant::now();
        let result = session(Arc::clone(&agent), shutdown.clone()).await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!(
                coordinator = agent.coordinator(),
                "coordinator closed the connection"
            ),
            Err(e) => {
                tracing::warn!(coordinator = agent.coordinator(), error = %e, "connection to the coordinator failed")
            }
        }
        let round_done = agent.move_on();
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(500);
        }
        // Full jitter: many agents reconnecting after a coordinator restart spread out.
        let jitter = u64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng))
            % (u64::try_from(backoff.as_millis()).unwrap_or(1).max(1));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(jitter)) => {}
            _ = shutdown.changed() => return,
        }
        // Slower only once every coordinator failed: the next node of a
        // cluster is tried as soon as one is lost.
        if round_done {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

async fn session(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // No Nagle: a job's output is many small frames, and delaying each one
    // behind the previous one's ACK adds up to 40 ms to the first token.
    let url = ws_url(agent.coordinator());
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let (mut sink, mut stream) = ws.split();
    let key = agent.identity.public_key();
    let hello = WorkerMsg::Hello {
        protocol: protocol::PROTOCOL_VERSION,
        key,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    sink.send(Message::text(hello.to_text())).await?;
    let (nonce, coordinator_key) = match next_control(&mut stream).await? {
        CoordinatorMsg::Challenge {
            nonce,
            coordinator_key,
        } => (nonce, coordinator_key),
        other => anyhow::bail!("expected a challenge, got {other:?}"),
    };
    let nonce: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(&nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("bad nonce"))?;
    let sig = agent
        .identity
        .key
        .sign(&protocol::auth_message(&nonce, &coordinator_key, &key));
    sink.send(Message::text(
        WorkerMsg::Auth {
            signature: Signature(sig.to_bytes()),
        }
        .to_text(),
    ))
    .await?;
    let interval_ms = match next_control(&mut stream).await? {
        CoordinatorMsg::Welcome {
            worker,
            heartbeat_interval_ms,
        } => {
            tracing::info!(%worker, coordinator = agent.coordinator(), "connected");
            heartbeat_interval_ms.clamp(1_000, 60_000)
        }
        other => anyhow::bail!("expected welcome, got {other:?}"),
    };

    let (out, mut out_rx) = mpsc::channel::<Message>(OUTBOX);
    let writer = tokio::spawn(async move {
        'out: while let Some(m) = out_rx.recv().await {
            // Whatever else is already queued (other jobs' frames) goes out
            // in the same write: one syscall for a burst, not one per frame.
            // Yielding once first lets the jobs woken by the same engine
            // readiness queue theirs: no timer, so no added wait when idle.
            tokio::task::yield_now().await;
            let mut next = Some(m);
            while let Some(m) = next.take() {
                if sink.feed(m).await.is_err() {
                    break 'out;
                }
                next = out_rx.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let cancels: Arc<Mutex<HashMap<JobId, watch::Sender<bool>>>> = Arc::default();
    let mut beat = tokio::time::interval(Duration::from_millis(interval_ms));
    let result = loop {
        tokio::select! {
            _ = beat.tick() => {
                if out.send(Message::text(WorkerMsg::Heartbeat(agent.heartbeat()).to_text())).await.is_err() {
                    break Ok(());
                }
                if agent.draining.load(Ordering::SeqCst) && agent.active_jobs() == 0 {
                    break Ok(());
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    // Drain: say so, finish what runs, take nothing new.
                    agent.draining.store(true, Ordering::SeqCst);
                    let _ = out.send(Message::text(WorkerMsg::Heartbeat(agent.heartbeat()).to_text())).await;
                    beat = tokio::time::interval(Duration::from_millis(200));
                }
            }
            msg = stream.next() => {
                let text = match msg {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => break Ok(()),
                    Some(Ok(_)) => continue,
                };
                match CoordinatorMsg::parse(&text) {
                    Ok(CoordinatorMsg::Job { job, hold, consumer, model, path, body }) => {
                        if agent.draining.load(Ordering::SeqCst) || agent.active_jobs() >= agent.slots {
                            let _ = out.send(Message::text(WorkerMsg::JobFailed { job, status: 503, error: "worker is busy or draining".into() }.to_text())).await;
                            continue;
                        }
                        let (cancel_tx, cancel_rx) = watch::channel(false);
                        cancels.lock().expect("cancels lock").insert(job, cancel_tx);
                        agent.active.fetch_add(1, Ordering::SeqCst);
                        let (agent, out, cancels) = (Arc::clone(&agent), out.clone(), Arc::clone(&cancels));
                        tokio::spawn(async move {
                            let spec = JobSpec { job, hold, consumer, model, path, body };
                            run_job(&agent, spec, coordinator_key, out, cancel_rx).await;
                            cancels.lock().expect("cancels lock").remove(&job);
                            agent.active.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Ok(CoordinatorMsg::Cancel { job }) => {
                        if let Some(c) = cancels.lock().expect("cancels lock").get(&job) {
                            let _ = c.send(true);
                        }
                    }
                    Ok(CoordinatorMsg::Goodbye { reason }) => break Err(anyhow::anyhow!("coordinator said goodbye: {reason}")),
                    Ok(other) => tracing::warn!(?other, "unexpected message"),
                    Err(e) => break Err(anyhow::anyhow!("bad message from the coordinator: {e}")),
                }
            }
        }
    };
    // Running jobs end with the connection: tell them, then let the writer go.
    for c in cancels.lock().expect("cancels lock").values() {
        let _ = c.send(true);
    }
    drop(out);
    let _ = writer.await;
    result
}

async fn next_control<S>(stream: &mut S) -> anyhow::Result<CoordinatorMsg>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(CoordinatorMsg::parse(&t)?),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => anyhow::bail!("unexpected frame during handshake: {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed during handshake"),
        }
    }
}

struct JobSpec {
    job: JobId,
    hold: troop_schemas::HoldId,
    consumer: troop_schemas::AccountId,
    model: String,
    path: String,
    body: String,
}

fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one job against the engine, forwarding its output as it comes, and
/// ends with a signed receipt (or a failure). Its span carries the job id,
/// which is the coordinator's request id.
#[tracing::instrument(name = "job", skip_all, fields(id = %spec.job, model = %spec.model))]
async fn run_job(
    agent: &Agent,
    spec: JobSpec,
    _coordinator_key: PublicKey,
    out: mpsc::Sender<Message>,
    mut cancel: watch::Receiver<bool>,
) {
    let started_at_ms = now_ms();
    let failed = |status: u16, error: String| {
        WorkerMsg::JobFailed {
            job: spec.job,
            status,
            error,
        }
        .to_text()
    };
    if spec.path != "/v1/chat/completions" && spec.path != "/v1/completions" {
        let _ = out
            .send(Message::text(failed(
                400,
                format!("unsupported path {}", spec.path),
            )))
            .await;
        return;
    }
    let url = format!("{}{}", agent.engine.base_url, spec.path);
    let request = agent
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(spec.body.clone())
        .send();
    let resp = tokio::select! {
        r = request => r,
        _ = cancel.changed() => return,
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let _ = out
                .send(Message::text(failed(
                    502,
                    format!("engine unreachable: {e}"),
                )))
                .await;
            return;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BYTES)]).into_owned();
        let _ = out.send(Message::text(failed(status, text))).await;
        return;
    }
    let _ = out
        .send(Message::text(
            WorkerMsg::JobStarted { job: spec.job }.to_text(),
        ))
        .await;
    let mut meter = Meter::new();
    let mut body = resp.bytes_stream();
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            // Dropping the response closes the engine connection, which stops generation.
            _ = cancel.changed() => break,
        };
        let chunk: Bytes = match chunk {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::warn!(job = %spec.job, error = %e, "engine stream broke");
                break;
            }
        };
        for piece in chunk.chunks(protocol::MAX_DATA_FRAME_BYTES) {
            if meter.feed(piece).is_err() {
                tracing::warn!(job = %spec.job, "engine sent something that is not an event stream");
            }
            let frame =
                DataFrame::encode(&spec.job, piece).expect("pieces are within the frame limit");
            if out.send(Message::binary(frame)).await.is_err() {
                return;
            }
        }
    }
    let reading = meter.finish();
    let usage = reading.usage.map(|u| EngineUsage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
    });
    let receipt = Receipt {
        consumer: spec.consumer,
        finished_at_ms: now_ms(),
        hold: spec.hold,
        input_tokens: usage.map_or(0, |u| u.prompt_tokens),
        job: spec.job,
        model: spec.model,
        output_tokens: usage.map_or(reading.deltas, |u| u.completion_tokens),
        request_digest: Digest::of(spec.body.as_bytes()),
        response_digest: reading.digest,
        started_at_ms,
        worker: agent.identity.worker_id(),
        worker_key: agent.identity.public_key(),
    };
    let Ok(bytes) = receipt.signing_bytes() else {
        let _ = out
            .send(Message::text(failed(
                500,
                "receipt could not be encoded".into(),
            )))
            .await;
        return;
    };
    let worker_sig = Signature(agent.identity.key.sign(&bytes).to_bytes());
    let done = WorkerMsg::JobDone {
        job: spec.job,
        usage,
        receipt: Box::new(receipt),
        worker_sig,
    };
    let _ = out.send(Message::text(done.to_text())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_of(coordinators: Vec<String>) -> Arc<Agent> {
        let engine = Engine {
            kind: protocol::EngineKind::OpenAiCompatible,
            base_url: "http://127.0.0.1:1".into(),
            models: Vec::new(),
            slots: 1,
        };
        Agent::with(
            coordinators,
            engine,
            Identity::ephemeral(),
            1,
            GpuSource::Fixed(Vec::new()),
            reqwest::Client::new(),
        )
    }

    #[test]
    fn websocket_urls_follow_the_scheme() {
        assert_eq!(ws_url("http://a:1/"), "ws://a:1/worker");
        assert_eq!(
            ws_url("https://troop.example"),
            "wss://troop.example/worker"
        );
        assert_eq!(ws_url("ws://a:1"), "ws://a:1/worker");
    }

    #[test]
    fn each_session_after_the_first_goes_to_the_next_coordinator() {
        let agent = agent_of(vec![
            "http://a".into(),
            "http://b".into(),
            "http://c".into(),
        ]);
        let mut seen = Vec::new();
        let mut rounds = Vec::new();
        for _ in 0..4 {
            seen.push(agent.coordinator().to_owned());
            rounds.push(agent.move_on());
        }
        assert_eq!(seen, ["http://a", "http://b", "http://c", "http://a"]);
        assert_eq!(rounds, [false, false, true, false], "a round ends after c");
        let alone = agent_of(vec!["http://a".into()]);
        assert!(
            alone.move_on(),
            "with one coordinator every retry is a round"
        );
    }

    #[test]
    #[should_panic(expected = "coordinators")]
    fn an_agent_needs_a_coordinator() {
        let _ = agent_of(Vec::new());
    }
}
