//! What every cluster node serves from the shared services (CLUSTER.md,
//! "The ledger: one sequencer, fenced"): `/ledger/` read from Postgres, so an
//! auditor may ask any node whichever leads, and `/metrics` with the
//! sequencer's progress and its lag behind the ledger partitions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

use crate::cluster::Reconnecting;
use crate::cluster::kafka_log::TopicReader;
use crate::cluster::ledger_store::read_file;
use crate::cluster::sequencer::SequencerProgress;
use crate::config::ClusterConfig;
use crate::eventlog::EventLogError;
use crate::metrics::Metrics;

/// The state behind a node's ledger endpoints.
pub struct LedgerNode {
    cluster: ClusterConfig,
    pg: Reconnecting,
    progress: Arc<SequencerProgress>,
    metrics: Metrics,
    /// Asks the broker where each ledger partition ends (opened on first use).
    ends: Arc<Mutex<Option<TopicReader>>>,
}

impl std::fmt::Debug for LedgerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerNode").finish_non_exhaustive()
    }
}

impl LedgerNode {
    /// `progress` is this node's sequencer task's (leading or standing by).
    pub fn new(cluster: ClusterConfig, progress: Arc<SequencerProgress>) -> Self {
        Self {
            pg: Reconnecting::new(&cluster.postgres, "ledger node"),
            cluster,
            progress,
            metrics: Metrics::new(),
            ends: Arc::new(Mutex::new(None)),
        }
    }

    /// Committed records of the ledger partitions past the sequencer's stored
    /// positions. Asks the broker (blocking, off the runtime).
    async fn lag_records(&self) -> Result<u64, String> {
        let client = self.pg.get().await.map_err(|e| e.to_string())?;
        let topic = self.cluster.topic("ledger");
        let positions: BTreeMap<i32, i64> =
            crate::cluster::projection_store::positions(&client, &topic)
                .await
                .map_err(|e| e.to_string())?;
        let (ends, brokers, partitions) = (
            Arc::clone(&self.ends),
            self.cluster.kafka_brokers.clone(),
            self.cluster.ledger_partitions,
        );
        let client_id = format!("{}-ledger-lag", self.cluster.topic_prefix);
        tokio::task::spawn_blocking(move || -> Result<u64, EventLogError> {
            let mut reader = ends
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if reader.is_none() {
                *reader = Some(TopicReader::open(&brokers, &topic, &client_id)?);
            }
            let reader = reader.as_mut().expect("opened above");
            let mut lag = 0u64;
            for p in 0..partitions {
                let partition = i32::try_from(p).unwrap_or(i32::MAX);
                let at = positions.get(&partition).copied().unwrap_or(0);
                lag += reader
                    .end(partition)?
                    .saturating_sub(u64::try_from(at).unwrap_or(0));
            }
            Ok(lag)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }
}

async fn ledger_file(req: HttpRequest, node: web::Data<LedgerNode>) -> HttpResponse {
    let path = req.match_info().query("path");
    if troop_ledger::store::check_path(path).is_err() {
        return HttpResponse::NotFound().finish();
    }
    let body = match node.pg.get().await {
        Ok(client) => read_file(&client, path).await,
        Err(e) => Err(e),
    };
    match body {
        Ok(body) => crate::server::ledger_response(path, body),
        Err(e) => {
            tracing::warn!(error = %e, "reading the ledger from postgres failed");
            HttpResponse::ServiceUnavailable()
                .insert_header(("Retry-After", "1"))
                .finish()
        }
    }
}

async fn metrics(node: web::Data<LedgerNode>) -> HttpResponse {
    use std::sync::atomic::Ordering;
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let p = &node.progress;
    let m = &node.metrics;
    m.sequencer_leading
        .set(i64::from(p.leading.load(Ordering::SeqCst)));
    let (size, published) = (
        p.tree_size.load(Ordering::SeqCst),
        p.published.load(Ordering::SeqCst),
    );
    // A standby knows the ledger only from Postgres; the leader's own
    // numbers are the freshest.
    if p.leading.load(Ordering::SeqCst) {
        m.ledger_entries.set(gauge(size));
        m.ledger_lag_entries
            .set(gauge(size.saturating_sub(published)));
    } else if let Ok(client) = node.pg.get().await
        && let Ok((size, published)) = crate::cluster::reads::sizes(&client).await
    {
        m.ledger_entries.set(size);
        m.ledger_lag_entries.set((size - published).max(0));
    }
    match node.lag_records().await {
        Ok(lag) => m.sequencer_lag_records.set(gauge(lag)),
        Err(e) => tracing::warn!(error = %e, "measuring the sequencer's lag failed"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(m.render())
}

/// Serves `/ledger/…` and `/metrics` on `listener`, and the internal API
/// between nodes when this node owns partitions (`internal`), until the
/// server is stopped (its signals are the caller's: the server handles none).
pub fn serve(
    node: LedgerNode,
    internal: Option<crate::cluster::internal::Internal>,
    listener: std::net::TcpListener,
) -> std::io::Result<actix_web::dev::Server> {
    let node = web::Data::new(node);
    Ok(HttpServer::new(move || {
        let app = App::new()
            .app_data(node.clone())
            .route("/ledger/{path:.*}", web::get().to(ledger_file))
            .route("/metrics", web::get().to(metrics));
        match &internal {
            Some(internal) => app.configure(crate::cluster::internal::routes(internal.clone())),
            None => app.configure(|_| {}),
        }
    })
    .on_connect(crate::server::no_delay)
    .workers(2)
    .disable_signals()
    .listen(listener)?
    .run())
}
