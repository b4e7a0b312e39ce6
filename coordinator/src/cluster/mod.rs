//! The coordinator cluster on Kafka and Postgres (CLUSTER.md). Built slice by
//! slice; today: `migrate` (topics and the projections' schema), the event
//! log on a Kafka partition, the ledger's sequencer with its order log and its
//! projection into Postgres, `replay` from Kafka, partition ownership (the
//! owners' group, each owned partition's fenced log and fold, the internal
//! API through which any node has a change judged by its owner), the node
//! itself (the whole API over the shared services), and requests relayed to
//! another node's workers (`presence`, `relay`).

pub mod directory;
pub mod history;
pub mod idle;
pub mod internal;
pub mod kafka_log;
pub mod ledger_node;
pub mod ledger_store;
pub mod migrate;
pub mod node;
pub mod owned;
pub mod owner;
pub mod ownership;
pub mod peers;
pub mod presence;
pub mod priority;
pub mod projection;
pub mod projection_store;
pub mod reads;
pub mod relay;
pub mod replay;
pub mod rows;
pub mod sequence_log;
pub mod sequencer;

/// A task on the blocking pool that panicked or was cancelled; each layer's
/// error type takes it in (`From`).
#[derive(Debug, thiserror::Error)]
#[error("a blocking task failed: {0}")]
pub struct BlockingFailed(pub String);

/// Runs `f` on the blocking pool: Kafka reads and writes and the log writer
/// wait on the network and must not hold a runtime thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingFailed> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BlockingFailed(e.to_string()))
}

/// A Postgres client on `postgres` (a libpq string) whose connection is
/// driven on the current runtime until it ends (logged as `what`'s).
pub async fn connect(
    postgres: &str,
    what: &'static str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(postgres, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, what, "postgres connection ended");
        }
    });
    Ok(client)
}

/// A connection holding Postgres advisory lock `lock` if no other session
/// holds it (`None` then), and a receiver that fires when the connection
/// ended: the lock lives exactly as long as the connection, so a leader whose
/// connection is gone has lost its term, and whatever it writes on that
/// connection fails with it.
pub async fn try_lead(
    postgres: &str,
    lock: i64,
    what: &'static str,
) -> Result<
    Option<(tokio_postgres::Client, tokio::sync::oneshot::Receiver<()>)>,
    tokio_postgres::Error,
> {
    let (client, connection) = tokio_postgres::connect(postgres, tokio_postgres::NoTls).await?;
    let (lost_tx, lost) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, what, "leader's connection ended");
        }
        let _ = lost_tx.send(());
    });
    let leads: bool = client
        .query_one("select pg_try_advisory_lock($1)", &[&lock])
        .await?
        .get(0);
    Ok(leads.then_some((client, lost)))
}

/// A Postgres client that reconnects after its connection ended: a database
/// restart must not take a node's reads down for good.
#[derive(Debug)]
pub struct Reconnecting {
    url: String,
    what: &'static str,
    client: tokio::sync::Mutex<Option<std::sync::Arc<tokio_postgres::Client>>>,
}

impl Reconnecting {
    /// Connects on first use (libpq string `postgres`; logged as `what`'s).
    pub fn new(postgres: &str, what: &'static str) -> Self {
        Self {
            url: postgres.to_owned(),
            what,
            client: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn get(
        &self,
    ) -> Result<std::sync::Arc<tokio_postgres::Client>, tokio_postgres::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(std::sync::Arc::clone(c));
        }
        let client = std::sync::Arc::new(connect(&self.url, self.what).await?);
        *slot = Some(std::sync::Arc::clone(&client));
        Ok(client)
    }
}

/// Reads what is left of an internal answer whose last message was read, so
/// that its connection goes back to the client's pool. Why: a body dropped
/// before its end closes the connection, and the next call between the
/// same nodes then pays a new one (BENCHMARKS.md, cluster TTFT run 9). An
/// answer that sends more than its end within a moment is dropped instead.
pub(crate) async fn finish(response: &mut reqwest::Response) {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(1);
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(Some(chunk)) = response.chunk().await {
            if !chunk.is_empty() {
                break;
            }
        }
    })
    .await;
}
