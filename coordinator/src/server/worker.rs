//! One worker connection: handshake, then control messages to the actors and
//! output bytes straight into each job's bounded channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor as _, Addr};
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::Message;
use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use tokio::sync::mpsc;
use troop_schemas::protocol::{self, CoordinatorMsg, DataFrame, WorkerMsg};
use troop_schemas::{PublicKey, WorkerId};

use super::{AppState, now_ms, random};
use crate::actors::registry::Register;
use crate::actors::worker::{Cancel, Control, Disconnected, JobTable, WorkerActor, WorkerLink};

const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Control messages queued to one worker; a worker this far behind is dropped.
const OUTBOX: usize = 256;

pub async fn connect(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream.max_frame_size(protocol::MAX_CONTROL_FRAME_BYTES + 64);
    let state = state.get_ref().clone();
    actix_web::rt::spawn(async move {
        let mut close = session.clone();
        if let Err(why) = run(state, session, stream).await {
            tracing::info!(%why, "worker connection ended");
            let _ = close
                .text(
                    CoordinatorMsg::Goodbye {
                        reason: why.clone(),
                    }
                    .to_text(),
                )
                .await;
        }
        let _ = close.close(None).await;
    });
    Ok(response)
}

async fn next_text(stream: &mut actix_ws::MessageStream) -> Result<String, String> {
    loop {
        match tokio::time::timeout(HANDSHAKE_DEADLINE, stream.recv()).await {
            Err(_) => return Err("handshake timed out".into()),
            Ok(None) => return Err("closed during handshake".into()),
            Ok(Some(Err(e))) => return Err(format!("protocol error: {e}")),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(_))) => return Err("expected a text frame during handshake".into()),
        }
    }
}

/// Proves the worker holds its key: it signs a fresh nonce bound to this coordinator.
async fn handshake(
    state: &AppState,
    session: &mut actix_ws::Session,
    stream: &mut actix_ws::MessageStream,
) -> Result<PublicKey, String> {
    let key = match WorkerMsg::parse(&next_text(stream).await?).map_err(|e| e.to_string())? {
        WorkerMsg::Hello { protocol, key, .. } if protocol == protocol::PROTOCOL_VERSION => key,
        WorkerMsg::Hello { protocol, .. } => {
            return Err(format!("protocol {protocol} is not supported"));
        }
        _ => return Err("expected hello".into()),
    };
    let nonce = random::<32>();
    let coordinator_key = PublicKey(state.coordinator_key.verifying_key().to_bytes());
    let challenge = CoordinatorMsg::Challenge {
        nonce: base64::engine::general_purpose::STANDARD.encode(nonce),
        coordinator_key,
    };
    session
        .text(challenge.to_text())
        .await
        .map_err(|e| e.to_string())?;
    let WorkerMsg::Auth { signature } =
        WorkerMsg::parse(&next_text(stream).await?).map_err(|e| e.to_string())?
    else {
        return Err("expected auth".into());
    };
    let vk = VerifyingKey::from_bytes(&key.0)
        .map_err(|_| "worker key is not an Ed25519 point".to_owned())?;
    if vk.is_weak() {
        return Err("weak worker key".into());
    }
    let message = protocol::auth_message(&nonce, &coordinator_key, &key);
    vk.verify_strict(
        &message,
        &ed25519_dalek::Signature::from_bytes(&signature.0),
    )
    .map_err(|_| "bad auth signature".to_owned())?;
    Ok(key)
}

/// First connection of a key: open its earnings account and register it in
/// the ledger (the read spares a reconnecting worker the books' judgement).
async fn ensure_registered(state: &AppState, key: PublicKey) -> Result<WorkerId, String> {
    let worker = WorkerId::from_key(&key);
    if state
        .reads
        .worker(worker)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(worker);
    }
    crate::money::register_worker(&*state.money, key, now_ms())
        .await
        .inspect_err(super::log_unknown)
        .map_err(|e| e.to_string())
}

async fn run(
    state: AppState,
    mut session: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
) -> Result<(), String> {
    let key = handshake(&state, &mut session, &mut stream).await?;
    if state
        .bans
        .read()
        .expect("bans lock")
        .contains(&WorkerId::from_key(&key))
    {
        return Err("this worker is banned".into());
    }
    let worker = ensure_registered(&state, key).await?;
    let welcome = CoordinatorMsg::Welcome {
        worker,
        heartbeat_interval_ms: state.config.heartbeat_interval_ms,
    };
    session
        .text(welcome.to_text())
        .await
        .map_err(|e| e.to_string())?;

    let (outbox, mut outbox_rx) = mpsc::channel::<CoordinatorMsg>(OUTBOX);
    let jobs: JobTable = Arc::new(Mutex::new(HashMap::new()));
    let actor = WorkerActor::new(worker, outbox, Arc::clone(&jobs), state.registry.clone());
    let connection = actor.connection();
    let addr = actor.start();
    state
        .registry
        .send(Register {
            link: WorkerLink {
                worker,
                addr: addr.clone(),
            },
            connection,
            banned: false,
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(%worker, "worker connected");

    let mut writer_session = session.clone();
    let writer = actix_web::rt::spawn(async move {
        while let Some(msg) = outbox_rx.recv().await {
            if writer_session.text(msg.to_text()).await.is_err() {
                break;
            }
        }
    });

    let result = read_loop(&state, &addr, &jobs, &mut session, &mut stream).await;

    writer.abort();
    // The actor tells the jobs still running that their worker is gone.
    addr.do_send(Disconnected);
    tracing::info!(%worker, "worker disconnected");
    result
}

async fn read_loop(
    state: &AppState,
    actor: &Addr<WorkerActor>,
    jobs: &JobTable,
    session: &mut actix_ws::Session,
    stream: &mut actix_ws::MessageStream,
) -> Result<(), String> {
    // A worker that says nothing for three heartbeat intervals is gone.
    let silence = Duration::from_millis(
        state
            .config
            .heartbeat_interval_ms
            .saturating_mul(3)
            .max(1_000),
    );
    let slow_consumer = Duration::from_millis(state.config.slow_consumer_ms.max(1));
    loop {
        let msg = match tokio::time::timeout(silence, stream.recv()).await {
            Err(_) => return Err("worker went silent".into()),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(format!("protocol error: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(frame) => {
                let data = DataFrame::decode(&frame).map_err(|e| e.to_string())?;
                let sender = jobs
                    .lock()
                    .expect("jobs lock")
                    .get(&data.job)
                    .map(|s| s.data.clone());
                // Unknown job: cancelled, or finished; its late bytes are dropped.
                if let Some(tx) = sender {
                    let bytes = frame.slice(16..);
                    // Bounded: a slow consumer slows this worker's connection, which is
                    // TCP backpressure all the way to the engine — for a while. A
                    // consumer that takes nothing for `slow_consumer_ms` loses its
                    // job, so that it cannot stall the worker's other jobs for good.
                    if tokio::time::timeout(slow_consumer, tx.send(bytes))
                        .await
                        .is_err()
                    {
                        // Forgotten at once, so that its later frames are dropped
                        // instead of waiting again; its session hears no end and
                        // voids the hold.
                        jobs.lock().expect("jobs lock").remove(&data.job);
                        actor.do_send(Cancel(data.job));
                        tracing::warn!(job = %data.job, "consumer stopped reading; job cancelled");
                    }
                }
            }
            Message::Text(text) => match WorkerMsg::parse(&text).map_err(|e| e.to_string())? {
                WorkerMsg::Hello { .. } | WorkerMsg::Auth { .. } => {
                    return Err("handshake message after the handshake".into());
                }
                msg => actor.do_send(Control {
                    msg,
                    now_ms: now_ms(),
                }),
            },
            Message::Ping(p) => {
                let _ = session.pong(&p).await;
            }
            Message::Close(_) => return Ok(()),
            Message::Pong(_) | Message::Nop => {}
            Message::Continuation(_) => return Err("fragmented frames are not used".into()),
        }
    }
}
