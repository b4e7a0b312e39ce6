//! The coordinator process: opens the books, starts the actors, serves HTTP.
//!
//! Routes: the OpenAI API (`/v1/…`), the worker WebSocket (`/worker`), the
//! published ledger (`/ledger/…`), the admin API (`/admin/…`).

mod admin;
mod consumer;
mod worker;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use troop_ledger::note::NoteSigner;
use troop_schemas::{CreditsMicro, Event, KeyRole, ModelPrice, PublicKey};

use crate::actors::account::Accounts;
use crate::actors::registry::Registry;
use crate::api::openai::ApiError;
use crate::books::Books;
use crate::config::Config;
use crate::embedded::{Embedded, PublishedSchedule};
use crate::eventlog::EventLog;
use crate::eventlog::file::{FileLog, FileLogConfig};
use crate::history::{EmbeddedHistory, WorkerEventSink};
use crate::keys::ApiKeys;
use crate::money::{Home, Money, MoneyError};
use crate::reads::Reads;
use crate::snapshot::Snapshot;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The embedded books: their timer expires holds and publishes.
    /// `None` on a cluster node, whose owners expire holds and whose
    /// sequencer publishes.
    pub books: Option<Arc<Embedded>>,
    /// Where balance changes are judged (the port; the books here).
    pub money: Arc<dyn Money>,
    /// Where accounts, workers, receipts and the ledger are read (the port).
    pub reads: Arc<dyn Reads>,
    /// The books' price schedule, readable without asking them.
    pub schedule: PublishedSchedule,
    pub registry: Addr<Registry>,
    pub keys: Arc<RwLock<ApiKeys>>,
    pub coordinator_key: Arc<SigningKey>,
    pub config: Arc<Config>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Banned workers: refused at connect, never offered work.
    pub bans: Arc<RwLock<std::collections::HashSet<troop_schemas::WorkerId>>>,
    /// One actor per active account: request limits, spending in order.
    pub accounts: Accounts,
    /// Jobs started and failed, heartbeat summaries: logged and projected.
    pub worker_events: WorkerEventSink,
    /// Sends jobs to other nodes' workers (`None` when embedded: there are none).
    pub relay: Option<Arc<crate::cluster::relay::Relay>>,
    /// This node's incarnation, named by the holds of its requests (`None`
    /// when embedded: a restart voids them all).
    pub origin: Option<String>,
    /// What a cluster node's `/metrics` adds (`None` when embedded).
    pub node_gauges: Option<crate::cluster::node::NodeGauges>,
    /// Asks the other nodes for their workers (`None` when embedded).
    pub peers: Option<Arc<crate::cluster::peers::Peers>>,
}

pub use crate::directory::{BanEvent, TAG_BAN_EVENT};

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppState")
    }
}

pub fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b
}

/// A 32-byte secret in a file only the owner can read, made on first start.
/// The log key before a rotation, if the operator left it at
/// `<data_dir>/ledger.previous.key` (RUNBOOK.md): the checkpoint it signed
/// last is accepted once and signed again with the new key.
pub fn previous_log_key(
    dir: &Path,
    name: &str,
) -> anyhow::Result<Option<troop_ledger::note::NoteVerifier>> {
    let path = dir.join(PREVIOUS_LOG_KEY);
    if !path.exists() {
        return Ok(None);
    }
    let seed = crate::cluster::node::shared_secret(&path)?;
    Ok(Some(
        NoteSigner::new(name, SigningKey::from_bytes(&seed))?.verifier(),
    ))
}

/// Where [`previous_log_key`] looks.
pub const PREVIOUS_LOG_KEY: &str = "ledger.previous.key";

fn secret_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Ok(text) = std::fs::read_to_string(path) {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out)
            .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
        return Ok(out);
    }
    let secret = random::<32>();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{}", hex::encode(secret))?;
    f.sync_all()?;
    Ok(secret)
}

pub fn error_response(e: &ApiError) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(e.status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = HttpResponse::build(status);
    if let Some(s) = e.retry_after_s {
        r.insert_header(("Retry-After", s.to_string()));
    }
    r.json(e.body())
}

/// Opens the books, replays keys, records keys and prices in the ledger, voids
/// holds of requests that died with the previous process, and starts the actors.
/// Must run inside an actix system.
pub fn open_state(config: Config) -> anyhow::Result<AppState> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_key = SigningKey::from_bytes(&secret_file(&dir.join("ledger.key"))?);
    let coordinator_key = SigningKey::from_bytes(&secret_file(&dir.join("coordinator.key"))?);
    let hash_key = secret_file(&dir.join("apikey-hash.key"))?;
    let events: Arc<dyn EventLog> =
        Arc::new(FileLog::open(dir.join("events"), FileLogConfig::default())?);
    let signer = NoteSigner::new(&config.ledger_name, log_key.clone())?;
    std::fs::write(
        dir.join("ledger.vkey"),
        format!("{}\n", signer.verifier().to_key_string()),
    )?;
    let ledger_dir = dir.join("ledger");
    if let Some(previous) = previous_log_key(&dir, &config.ledger_name)? {
        // The key was rotated: the published tree is signed again under the
        // new key before the books open it (they accept only the new one).
        troop_ledger::writer::LogWriter::open_rotated(
            troop_ledger::store::DirStore::open(&ledger_dir)?,
            signer.clone(),
            Some(&previous),
        )
        .context("taking the ledger over with the new log key")?;
    }
    // One replay of the event log feeds every projection — balances, keys,
    // bans, worker history — from the newest usable snapshot on.
    let snapshots_dir = dir.join("snapshots");
    let snapshot = Snapshot::latest(&snapshots_dir, events.next_offset());
    let from_snapshot = snapshot.as_ref().map_or(0, |s| s.offset);
    let replay = |snapshot: Snapshot| -> Result<_, crate::books::BooksError> {
        let signer = NoteSigner::new(&config.ledger_name, log_key.clone()).map_err(|e| {
            crate::books::BooksError::Corrupt {
                offset: 0,
                why: e.to_string(),
            }
        })?;
        let (start, mut others) = snapshot.split();
        let (books, recovery) = Books::open_at(
            Arc::clone(&events),
            &ledger_dir,
            signer,
            start,
            &mut |record| others.fold_other(record),
        )?;
        Ok((books, recovery, others))
    };
    let (mut books, recovery, others) = match snapshot {
        Some(s) => replay(s).or_else(|e| {
            tracing::warn!(error = %e, "the snapshot could not be used; replaying the whole event log");
            replay(Snapshot::empty())
        })?,
        None => replay(Snapshot::empty())?,
    };
    drop(signer);
    // What was just replayed is durable and published: a snapshot of it makes
    // the next start replay only what comes after.
    let snapshot = others.join(books.start_here(recovery.records));
    if snapshot.offset > from_snapshot
        && let Err(e) = snapshot.write(&snapshots_dir)
    {
        tracing::warn!(error = %e, "writing the start-up snapshot failed");
    }
    let keys = ApiKeys::with_table(hash_key, snapshot.keys.clone());
    let bans = snapshot.bans.clone();
    let history = snapshot.history.clone();
    if config.snapshot_every_records > 0 {
        crate::snapshot::spawn_snapshotter(
            Arc::clone(&events),
            snapshots_dir,
            snapshot,
            config.snapshot_every_records,
            books.published_counter(),
        )?;
    }
    tracing::info!(
        records = recovery.records,
        entries = recovery.entries,
        republished = recovery.republished,
        "books rebuilt from the event log"
    );

    let now = now_ms();
    let network = crate::reads::Network::of(books.ledger());
    let genesis = genesis(&network, &config, &log_key, &coordinator_key, now)?;
    for verdict in books.commit(&genesis)? {
        verdict?;
    }
    let voided = books.void_orphaned_holds(now)?;
    if voided > 0 {
        tracing::info!(
            voided,
            "voided holds of requests that died with the previous process"
        );
    }
    books.publish()?;

    let schedule = PublishedSchedule::default();
    let embedded = Arc::new(Embedded::new(
        books,
        schedule.clone(),
        Arc::clone(&events),
        ledger_dir,
    ));
    let worker_events = WorkerEventSink {
        log: Arc::new(EmbeddedHistory {
            events: Arc::clone(&events),
            history: Arc::new(RwLock::new(history)),
        }),
    };
    let registry = Registry::new(
        config.heartbeat_timeout_ms,
        config.heartbeat_epoch_ms,
        worker_events.clone(),
    )
    .start_apart();
    let config_limits = config.rate_limits;
    let account_idle_check = Duration::from_millis(config.account_idle_check_ms);
    let money: Arc<dyn Money> = embedded.clone();
    Ok(AppState {
        books: Some(Arc::clone(&embedded)),
        money: Arc::clone(&money),
        reads: embedded,
        schedule,
        registry,
        keys: Arc::new(RwLock::new(keys)),
        coordinator_key: Arc::new(coordinator_key),
        config: Arc::new(config),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        bans: Arc::new(RwLock::new(bans)),
        accounts: Accounts::new(money, config_limits, account_idle_check),
        worker_events,
        relay: None,
        origin: None,
        node_gauges: None,
        peers: None,
    })
}

async fn ledger_file(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let path = req.match_info().query("path").to_owned();
    if troop_ledger::store::check_path(&path).is_err() {
        return HttpResponse::NotFound().finish();
    }
    match state.reads.ledger_file(path.clone()).await {
        Ok(body) => ledger_response(&path, body),
        Err(e) => {
            tracing::warn!(error = %e, "reading the ledger failed");
            HttpResponse::ServiceUnavailable()
                .insert_header(("Retry-After", "1"))
                .finish()
        }
    }
}

/// One file of `/ledger/` (the tiles layout), or 404, with the caching an
/// auditor's proxy may apply; shared by the embedded and the cluster nodes.
pub fn ledger_response(path: &str, body: Option<Vec<u8>>) -> HttpResponse {
    let Some(bytes) = body else {
        return HttpResponse::NotFound().finish();
    };
    // Full tiles and bundles never change; partial ones and the checkpoint do.
    let immutable = path.starts_with("tile/") && !path.contains(".p/");
    let cache = if immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let kind = if path == "checkpoint" {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    HttpResponse::Ok()
        .content_type(kind)
        .insert_header(("Cache-Control", cache))
        .body(bytes)
}

/// Whether this coordinator takes consumer requests: a load balancer's or an
/// orchestrator's readiness check. A cluster node answers (admin calls,
/// `/v1/models`) before it has read the network's prices; until it has, a
/// chat request would be refused with a 503, so it is not ready.
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match state.schedule.get() {
        Some(_) => HttpResponse::Ok().json(serde_json::json!({"ready": true})),
        None => error_response(&ApiError::starting()),
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state
        .metrics
        .accounts_active
        .set(i64::try_from(state.accounts.active()).unwrap_or(i64::MAX));
    if let Ok(n) = state.registry.send(crate::actors::registry::Online).await {
        state
            .metrics
            .workers_online
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    if let Ok(lag) = state.reads.lag().await {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        state.metrics.ledger_entries.set(gauge(lag.entries));
        state
            .metrics
            .ledger_lag_entries
            .set(gauge(lag.ledger_entries));
        if let Some(queued) = lag.log_records {
            state.metrics.event_log_lag_records.set(gauge(queued));
        }
    }
    if let Some(node) = &state.node_gauges {
        node.set(&state.metrics);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// Opens `config` and serves it on `listener` from a thread of its own (its
/// own actix system), returning once it serves or failed to open. For tests
/// and tools that embed a coordinator; the binary runs [`serve`] itself.
pub fn spawn(config: Config, listener: std::net::TcpListener) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = open_state(config).and_then(|state| serve(state, listener));
                match server {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(()));
                        if let Err(e) = server.await {
                            tracing::error!(error = %e, "coordinator stopped");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the coordinator thread died while opening"))?
}

/// What the ledger should say of the network's keys and prices that
/// `network` (what it says now) does not: the events to publish at start.
pub fn genesis(
    network: &crate::reads::Network,
    config: &Config,
    log_key: &SigningKey,
    coordinator_key: &SigningKey,
    now: u64,
) -> anyhow::Result<Vec<Event>> {
    let mut genesis = Vec::new();
    let key_of = |k: &SigningKey| PublicKey(k.verifying_key().to_bytes());
    if network.log_key.as_ref().map(|(n, k)| (n.as_str(), *k))
        != Some((config.ledger_name.as_str(), key_of(log_key)))
    {
        genesis.push(Event::KeyRotated {
            role: KeyRole::Log,
            name: config.ledger_name.clone(),
            key: key_of(log_key),
            at_ms: now,
        });
    }
    if network.coordinator_key != Some(key_of(coordinator_key)) {
        genesis.push(Event::KeyRotated {
            role: KeyRole::Coordinator,
            name: "coordinator".into(),
            key: key_of(coordinator_key),
            at_ms: now,
        });
    }
    let wanted: Vec<ModelPrice> = config
        .prices
        .iter()
        .map(|p| {
            Ok(ModelPrice {
                model: p.model.clone(),
                input_micro_per_1k: CreditsMicro::new(p.input_micro_per_1k)
                    .context("price too large")?,
                output_micro_per_1k: CreditsMicro::new(p.output_micro_per_1k)
                    .context("price too large")?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let current = network.schedule.as_ref();
    let same = current.is_some_and(|s| {
        s.fee_bps == config.fee_bps
            && s.prices.len() == wanted.len()
            && wanted.iter().all(|w| {
                s.prices.get(&w.model).is_some_and(|p| {
                    p.input_micro_per_1k == w.input_micro_per_1k.get()
                        && p.output_micro_per_1k == w.output_micro_per_1k.get()
                })
            })
    });
    if !same {
        let version = current.map_or(0, |s| s.version) + 1;
        genesis.push(Event::PriceSchedulePublished {
            version,
            fee_bps: config.fee_bps,
            prices: wanted,
            at_ms: now,
        });
    }
    Ok(genesis)
}

/// The embedded books' clock: a fresh checkpoint every second while there
/// is traffic (publish is a no-op otherwise); holds past their deadline
/// expire on the same clock.
async fn embedded_timer(books: Arc<Embedded>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok((expired, published)) = books.tick(now_ms()).await else {
            return; // The runtime is stopping.
        };
        match expired {
            Ok(0) => {}
            Ok(n) => tracing::warn!(holds = n, "expired holds whose requests were lost"),
            Err(e) => tracing::error!(error = %e, "expiring holds failed"),
        }
        if let Err(e) = published {
            tracing::error!(error = %e, "publishing the ledger failed");
        }
    }
}

/// Runs the coordinator on `listener` until the returned server is stopped.
pub fn serve(
    state: AppState,
    listener: std::net::TcpListener,
) -> anyhow::Result<actix_web::dev::Server> {
    serve_with(state, listener, |_| {})
}

/// [`serve`], with `more` routes mounted beside the usual ones (a cluster
/// node's internal API).
pub fn serve_with(
    state: AppState,
    listener: std::net::TcpListener,
    more: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
) -> anyhow::Result<actix_web::dev::Server> {
    let data = web::Data::new(state.clone());
    let max_body = state.config.max_body_bytes;
    let http_workers = state.config.http_workers;
    if let Some(books) = state.books.clone() {
        actix_web::rt::spawn(embedded_timer(books));
    }
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .configure(more.clone())
            .route("/v1/chat/completions", web::post().to(consumer::chat))
            .route("/v1/completions", web::post().to(consumer::completions))
            .route("/v1/models", web::get().to(consumer::models))
            .route("/v1/account", web::get().to(consumer::account))
            .route("/v1/receipts/{id}", web::get().to(consumer::receipt))
            .route("/worker", web::get().to(worker::connect))
            .route("/ledger/{path:.*}", web::get().to(ledger_file))
            .route("/metrics", web::get().to(metrics))
            .route("/health/ready", web::get().to(ready))
            .route("/admin/accounts", web::post().to(admin::open_account))
            .route("/admin/grants", web::post().to(admin::grant))
            .route("/admin/keys", web::post().to(admin::issue_key))
            .route("/admin/keys/revoke", web::post().to(admin::revoke_key))
            .route("/admin/accounts", web::get().to(admin::list_accounts))
            .route("/admin/workers", web::get().to(admin::list_workers))
            .route("/admin/workers/ban", web::post().to(admin::ban_worker))
            .route("/admin/prices", web::post().to(admin::set_prices))
    });
    let server = server.on_connect(no_delay);
    let server = match http_workers {
        0 => server,
        n => server.workers(n),
    };
    let server = server.listen(listener)?.shutdown_timeout(30).run();
    Ok(server)
}

/// Sends small writes at once on an accepted connection. A streamed
/// response's headers and its first chunk leave in separate writes when the
/// first chunk is not ready with the headers (a relayed job's response), and
/// with Nagle's algorithm on, the chunk would wait for the peer's delayed
/// ACK of the headers: 40 ms on Linux.
pub fn no_delay(connection: &dyn std::any::Any, _: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>()
        && let Err(e) = tcp.set_nodelay(true)
    {
        tracing::debug!(error = %e, "TCP_NODELAY could not be set");
    }
}

/// Commits one event of `home` and returns once it is durable. The books
/// only judge and queue, so concurrent requests' commits share the event
/// log's fsyncs.
pub async fn commit_one(state: &AppState, home: Home, event: Event) -> Result<u64, MoneyError> {
    crate::money::commit_one(&*state.money, home, event)
        .await
        .inspect_err(log_unknown)
}

/// Commits one change of `account`'s balance through the account's actor (in
/// the account's order) and returns once it is durable.
pub async fn commit_as(
    state: &AppState,
    account: troop_schemas::AccountId,
    event: Event,
) -> Result<u64, MoneyError> {
    let verdicts = state
        .accounts
        .change(account, vec![event])
        .await?
        .durable()
        .await
        .inspect_err(log_unknown)?;
    Ok(verdicts.into_iter().next().expect("one verdict")?)
}

fn log_unknown(e: &MoneyError) {
    if let MoneyError::Unknown(why) = e {
        tracing::error!(%why, "a write failed: nothing more is acknowledged; restart to recover");
    }
}
