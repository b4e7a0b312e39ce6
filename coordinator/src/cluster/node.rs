//! A cluster node (`troop-coordinator node`): the same HTTP API as the
//! embedded coordinator — the OpenAI API, the worker endpoint, `/ledger/`,
//! `/admin/`, `/metrics` — over the cluster's books: balance changes judged
//! by the partitions' owners ([`ClusterBooks`]), reads from the sequencer's
//! projection ([`PgReads`]), keys and bans from the directory, prices from
//! the network's entries; plus the internal API through which the other
//! nodes reach the partitions this node owns, and a sequencer that leads
//! when no other node does.
//!
//! A request is placed on this node's own workers when one has room, and
//! otherwise relayed to another node that offers the model
//! ([`crate::cluster::relay`], offers in `worker_presence`).
//!
//! Worker history (jobs started and failed, heartbeat summaries) goes to
//! `troop.workers` and `troop.jobs`; whichever node holds the projector's
//! lock projects it into Postgres, where every node reads it
//! ([`crate::cluster::history`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use troop_ledger::note::NoteSigner;

use crate::actors::account::Accounts;
use crate::actors::registry::{Ban, Registry};
use crate::cluster::history::{self, HistoryProgress, KafkaHistory};
use crate::cluster::internal::{self, ClusterBooks, Internal, Secret};
use crate::cluster::owned::{OwnedBooks, OwnedSettings};
use crate::cluster::ownership::Ownership;
use crate::cluster::peers::Peers;
use crate::cluster::priority;
use crate::cluster::reads::PgReads;
use crate::cluster::relay::{Relay, RelayHere};
use crate::cluster::sequencer::{SequencerProgress, SequencerSettings, SequencerTask};
use crate::cluster::{Reconnecting, directory, presence};
use crate::config::Config;
use crate::embedded::PublishedSchedule;
use crate::history::WorkerEventSink;
use crate::keys::ApiKeys;
use crate::money::{Home, Money, MoneyError};
use crate::reads::Reads;
use crate::server::AppState;

/// How often a node says it is alive, reads the prices in force and looks
/// for new keys and bans.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How long a starting node tries to get its keys and prices into the ledger
/// (the network's partition may have no owner yet).
pub const GENESIS_WAIT: Duration = Duration::from_secs(60);

/// Who this node is to the others.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Unique among live nodes (the owners' group member and `nodes` row).
    pub name: String,
    /// Where the other nodes reach its internal API (`http://host:port`).
    pub internal_url: String,
}

/// A 32-byte secret every node must hold the same copy of (the ledger key,
/// the coordinator key, the API keys' hashing key): never made here, since a
/// node with its own would sign or hash what no other node can follow.
pub fn shared_secret(path: &Path) -> anyhow::Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (every node holds the network's one copy: copy it there)",
            path.display()
        )
    })?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
    Ok(seed)
}

/// What a node's `/metrics` says beyond the embedded coordinator's: whether
/// its sequencer leads and which partitions it judges, so that alerts can
/// see a cluster with no leader or with an unowned partition.
#[derive(Clone, Debug)]
pub struct NodeGauges {
    sequencer: Arc<SequencerProgress>,
    history: Arc<HistoryProgress>,
    owned: Arc<OwnedBooks>,
    ledger_partitions: u32,
}

impl NodeGauges {
    pub fn set(&self, m: &crate::metrics::Metrics) {
        use std::sync::atomic::Ordering;
        m.sequencer_leading
            .set(i64::from(self.sequencer.leading.load(Ordering::SeqCst)));
        m.partitions_owned
            .set(i64::try_from(self.owned.loaded().len()).unwrap_or(i64::MAX));
        m.ledger_partitions.set(i64::from(self.ledger_partitions));
        m.history_projector_leading
            .set(i64::from(self.history.leading.load(Ordering::SeqCst)));
        m.history_lag_records.set(
            i64::try_from(self.history.lag_records.load(Ordering::SeqCst)).unwrap_or(i64::MAX),
        );
    }
}

/// A runtime of its own for the work no request waits on: the sequencer
/// and the history projector. Why: on the node's main arbiter their bursts
/// (folding, hashing and encoding a batch of a few thousand entries) delayed
/// the holds judged and the jobs placed there; measured in BENCHMARKS.md
/// (cluster TTFT run 7, `troop_request_phase_seconds`).
#[derive(Debug)]
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("troop-background")
            .on_thread_start(priority::lower_this_thread)
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    /// Runs `start` with this runtime as the current one, so that what it
    /// spawns runs here.
    fn enter<T>(&self, start: impl FnOnce() -> T) -> T {
        let _on = self.0.as_ref().expect("running until dropped").enter();
        start()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Dropped from async code (the node stopping): a blocking shutdown
        // would panic there, and what is left has been stopped or aborted.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What runs beside the HTTP server, until [`Node::stop`].
#[derive(Debug)]
pub struct Node {
    name: String,
    pg: Arc<Reconnecting>,
    ownership: Ownership,
    owned: Arc<OwnedBooks>,
    sequencer: SequencerTask,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Dropped last: the sequencer and the projector ran on it.
    background: Background,
}

impl Node {
    /// Leaves the owners' group, lets the owned partitions go, stops the
    /// sequencer (giving up the lead) and the refreshers.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
        }
        // The others stop relaying here now, not once the rows are stale.
        if let Ok(client) = self.pg.get().await
            && let Err(e) = presence::withdraw(&client, &self.name).await
        {
            tracing::warn!(error = %e, "withdrawing this node's worker presence failed");
        }
        if let Err(e) = self.ownership.stop().await {
            tracing::warn!(error = %e, "removing this node's partition owners failed");
        }
        if let Ok(owned) = Arc::try_unwrap(self.owned) {
            owned.stop().await;
        }
        if let Err(e) = self.sequencer.stop().await {
            tracing::warn!(error = %e, "stopping the sequencer failed");
        }
        drop(self.background);
    }
}

/// Opens a node: joins the owners' group, starts the owned books, the
/// sequencer and the refreshers, and returns the state to serve and the
/// internal API to mount beside it. Must run inside an actix system. Call
/// [`publish_genesis`] once the server listens (this node may own the
/// network's partition, which the others then reach through it).
pub async fn open(config: Config, me: NodeIdentity) -> anyhow::Result<(AppState, Internal, Node)> {
    let cluster = config.cluster.clone();
    let secret = Secret::new(&cluster.secret).context("[cluster] secret")?;
    anyhow::ensure!(
        (0..=priority::MAX_NICE).contains(&cluster.background_nice),
        "[cluster] background_nice is {}: it must be 0 to {}",
        cluster.background_nice,
        priority::MAX_NICE
    );
    // Before any background thread or Kafka client starts.
    priority::set_background_nice(cluster.background_nice);
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_key = SigningKey::from_bytes(&shared_secret(&dir.join("ledger.key"))?);
    let coordinator_key = SigningKey::from_bytes(&shared_secret(&dir.join("coordinator.key"))?);
    let hash_key = shared_secret(&dir.join("apikey-hash.key"))?;
    let signer = NoteSigner::new(&config.ledger_name, log_key)?;
    let verifier = signer.verifier();
    // What auditors verify checkpoints with, as the embedded default writes it.
    std::fs::write(
        dir.join("ledger.vkey"),
        format!("{}\n", verifier.to_key_string()),
    )
    .with_context(|| format!("writing {}", dir.join("ledger.vkey").display()))?;

    let ownership = Ownership::start(&cluster, &me.name).context("joining the owners' group")?;
    let owned = Arc::new(OwnedBooks::start(
        cluster.clone(),
        ownership.watch(),
        OwnedSettings::default(),
    ));
    let background = Background::new().context("starting the background runtime")?;
    let sequencer_settings = SequencerSettings {
        previous_log_key: crate::server::previous_log_key(&dir, &config.ledger_name)?,
        ..SequencerSettings::new(cluster.clone())
    };
    let sequencer = background.enter(|| SequencerTask::spawn(sequencer_settings, signer));
    let client = crate::cluster::connect(&cluster.postgres, "cluster books")
        .await
        .context("connecting to postgres")?;
    let money: Arc<dyn Money> = Arc::new(ClusterBooks::new(
        Arc::clone(&owned),
        &cluster.secret,
        client,
        cluster.ledger_partitions,
    ));
    let reads: Arc<dyn Reads> = Arc::new(PgReads::new(&cluster.postgres, verifier));

    let worker_events = WorkerEventSink {
        log: Arc::new(KafkaHistory::open(&cluster).context("the worker-history producer")?),
    };
    let registry = Registry::new(
        config.heartbeat_timeout_ms,
        config.heartbeat_epoch_ms,
        worker_events.clone(),
    )
    .start_apart();
    let keys = Arc::new(RwLock::new(ApiKeys::new(hash_key)));
    let bans = Arc::new(RwLock::new(HashSet::new()));
    let schedule = PublishedSchedule::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let pg = Arc::new(Reconnecting::new(&cluster.postgres, "node refresh"));
    // Advertised before any request can name it as a hold's origin: the
    // owners void the holds of an incarnation they do not see.
    let incarnation = format!("{}/{}", me.name, hex::encode(crate::server::random::<8>()));
    {
        let client = pg.get().await.context("connecting to postgres")?;
        presence::advertise(&client, &me.name, &me.internal_url, &incarnation)
            .await
            .context("advertising this node")?;
    }
    let banned = {
        let registry = registry.clone();
        move |worker| registry.do_send(Ban(worker))
    };
    let history = Arc::new(HistoryProgress::default());
    let tasks = vec![
        tokio::spawn(directory::follow(
            Arc::clone(&pg),
            Arc::clone(&keys),
            Arc::clone(&bans),
            banned,
            REFRESH_EVERY,
            stopped.clone(),
        )),
        tokio::spawn(refresh_schedule(Arc::clone(&reads), schedule.clone())),
        tokio::spawn(presence::follow(
            Arc::clone(&pg),
            me.name.clone(),
            registry.clone(),
            REFRESH_EVERY,
        )),
        tokio::spawn(advertise(Arc::clone(&pg), me.clone(), incarnation.clone())),
        background.enter(|| history::spawn(&cluster, Arc::clone(&history))),
    ];
    let state = AppState {
        books: None,
        money: Arc::clone(&money),
        reads,
        schedule,
        registry,
        keys,
        coordinator_key: Arc::new(coordinator_key),
        config: Arc::new(config.clone()),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        bans,
        accounts: Accounts::new(
            money,
            config.rate_limits,
            Duration::from_millis(config.account_idle_check_ms),
        ),
        worker_events,
        relay: Some(Arc::new(Relay::new(&cluster.secret))),
        origin: Some(incarnation),
        node_gauges: Some(NodeGauges {
            sequencer: Arc::clone(&sequencer.progress),
            history,
            owned: Arc::clone(&owned),
            ledger_partitions: cluster.ledger_partitions,
        }),
        peers: Some(Arc::new(Peers::new(
            &me.name,
            Arc::clone(&pg),
            &cluster.secret,
        ))),
    };
    let internal = Internal {
        owned: Arc::clone(&owned),
        secret,
        relay: Some(RelayHere {
            registry: state.registry.clone(),
            metrics: Arc::clone(&state.metrics),
            // The consumer API's limit, with room for JSON's escapes.
            max_job_bytes: config
                .max_body_bytes
                .saturating_mul(2)
                .saturating_add(64 << 10),
        }),
    };
    let node = Node {
        name: me.name,
        pg,
        ownership,
        owned,
        sequencer,
        stop,
        tasks,
        background,
    };
    Ok((state, internal, node))
}

/// Puts this node's keys and configured prices into the ledger where it
/// says otherwise, as the embedded coordinator does at start
/// ([`crate::server::genesis`]); asks again while the network's partition
/// has no owner or another node published first, up to [`GENESIS_WAIT`].
pub async fn publish_genesis(state: &AppState) -> anyhow::Result<()> {
    let log_key = shared_secret(&state.config.data_dir.join("ledger.key"))?;
    let started = tokio::time::Instant::now();
    loop {
        let attempt = async {
            let network = state.reads.network().await?;
            let events = crate::server::genesis(
                &network,
                &state.config,
                &SigningKey::from_bytes(&log_key),
                &state.coordinator_key,
                crate::server::now_ms(),
            )?;
            if events.is_empty() {
                // Serve at these prices now, not at the next refresh.
                state.schedule.set(network.schedule.as_ref());
                return anyhow::Ok(true);
            }
            let verdicts = state
                .money
                .change(Home::Network, events)
                .await?
                .durable()
                .await?;
            // Refused: another node published first; look again.
            Ok(verdicts.iter().all(Result::is_ok))
        }
        .await;
        match attempt {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if started.elapsed() >= GENESIS_WAIT => {
                return Err(e.context("publishing this node's keys and prices"));
            }
            Err(e) => {
                if let Some(MoneyError::Unknown(_)) = e.downcast_ref() {
                    // Its outcome shows in the ledger; the next look sees it.
                    tracing::warn!(error = %e, "publishing keys and prices: outcome unknown");
                }
            }
        }
        anyhow::ensure!(
            started.elapsed() < GENESIS_WAIT,
            "the ledger still disagrees with this node's keys and prices after {GENESIS_WAIT:?}"
        );
        // The sequencer puts what was judged into Postgres, where it is read.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps `schedule` at the ledger's price schedule.
async fn refresh_schedule(reads: Arc<dyn Reads>, schedule: PublishedSchedule) {
    loop {
        match reads.network().await {
            Ok(network) => schedule.set(network.schedule.as_ref()),
            Err(e) => tracing::warn!(error = %e, "reading the prices in force failed"),
        }
        tokio::time::sleep(REFRESH_EVERY).await;
    }
}

/// Says that this node is alive and where it answers internal calls,
/// every [`REFRESH_EVERY`].
async fn advertise(pg: Arc<Reconnecting>, me: NodeIdentity, incarnation: String) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let said = async {
            let client = pg.get().await?;
            presence::advertise(&client, &me.name, &me.internal_url, &incarnation).await
        }
        .await;
        if let Err(e) = said {
            tracing::warn!(error = %e, "advertising this node failed");
        }
    }
}

/// Opens a node and serves it on `listener` until the returned server stops;
/// the node's background work stops with it.
pub async fn serve(
    config: Config,
    me: NodeIdentity,
    listener: std::net::TcpListener,
) -> anyhow::Result<()> {
    let (state, internal, node) = open(config, me).await?;
    let server = crate::server::serve_with(state.clone(), listener, move |cfg| {
        internal::routes(internal.clone())(cfg);
    })?;
    let genesis = actix_web::rt::spawn(async move {
        if let Err(e) = publish_genesis(&state).await {
            tracing::error!(error = %e, "this node's keys and prices are not in the ledger");
        }
    });
    let served = server.await;
    genesis.abort();
    node.stop().await;
    served.context("serving")
}
