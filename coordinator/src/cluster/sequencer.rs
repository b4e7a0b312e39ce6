//! The sequencer as a running task (CLUSTER.md, "The ledger: one sequencer,
//! fenced"). Every node may run it; one leads at a time, holding a Postgres
//! advisory lock on its connection (a node that dies or loses the connection
//! loses the lock; a paused one that comes back is fenced by the
//! compare-and-swap on the tree size and by the forward-only checkpoint).
//!
//! The leader's rounds: read every ledger partition from the stored positions
//! (off the runtime), sequence and project the batch in one transaction
//! ([`Sequencer::apply`]), then integrate: append what Postgres holds past the
//! published tree to the log writer and publish tiles and a signed checkpoint
//! into Postgres ([`PgLogStore`]) at least every `checkpoint_interval` while
//! there is traffic, and as soon as it is caught up. The writer is given only
//! committed entries: those a round just committed from memory
//! ([`Unappended`]), older ones (a new leader's, or past the memory bound)
//! read back from Postgres; so what it publishes is always committed, and a
//! new leader picks up exactly where the last published checkpoint ended.
//! Three things overlap, each on its own thread: the next round's read and
//! signature checks, this round's transaction, and the last publish.

use super::{BlockingFailed, blocking};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use troop_ledger::note::{NoteSigner, NoteVerifier};
use troop_ledger::writer::{LogWriter, WriterError};

use crate::cluster::idle::IdlePause;
use crate::cluster::kafka_log::{KafkaLog, KafkaLogConfig};
use crate::cluster::ledger_store::PgLogStore;
use crate::cluster::projection::{Applied, Checked, LedgerFeed, ProjectionError, Sequencer};
use crate::cluster::projection_store::{PgProjection, ProjectionStore as _};
use crate::config::ClusterConfig;
use crate::eventlog::EventLogError;

/// Held by the leading sequencer for as long as its connection lives.
pub const SEQUENCER_LOCK: i64 = 0x7472_6f6f_705f_7371; // "troop_sq"
/// Entries read back from Postgres per query when integrating.
const INTEGRATE_BATCH_ENTRIES: i64 = 8_192;
/// Committed entries kept in memory for the log writer while a publish holds
/// it (about 16 rounds of the default batch); older ones are read back.
const UNAPPENDED_MAX_ENTRIES: usize = 1 << 18;

#[derive(Debug, Clone)]
pub struct SequencerSettings {
    pub cluster: ClusterConfig,
    /// Records read per partition per round: a batch is at most
    /// `ledger_partitions` × this.
    pub batch_per_partition: usize,
    /// A fresh checkpoint at least this often while there is traffic.
    pub checkpoint_interval: Duration,
    /// Pause after a round that found nothing new (`cluster::idle`): its
    /// bound is how late the first event after a quiet spell may be
    /// sequenced, traded for a broker not asked 50 times a second by an idle
    /// cluster.
    pub idle: IdlePause,
    /// How often a node that does not lead tries to take the lead, and the
    /// pause after a leader failed.
    pub standby_retry: Duration,
    /// The log key before a rotation: a leader accepts the checkpoint it
    /// signed and signs the same tree again with the current key.
    pub previous_log_key: Option<NoteVerifier>,
}

impl SequencerSettings {
    pub fn new(cluster: ClusterConfig) -> Self {
        Self {
            previous_log_key: None,
            cluster,
            batch_per_partition: 1_024,
            checkpoint_interval: Duration::from_secs(1),
            idle: IdlePause {
                first: Duration::from_millis(20),
                max: Duration::from_millis(160),
            },
            standby_retry: Duration::from_secs(1),
        }
    }

    fn topic(&self) -> String {
        self.cluster.topic("ledger")
    }
}

/// What the task has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct SequencerProgress {
    pub leading: AtomicBool,
    /// Entries in the ledger (sequenced and projected).
    pub tree_size: AtomicU64,
    /// Entries covered by the newest published checkpoint.
    pub published: AtomicU64,
    /// Times this node took the lead.
    pub terms: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("ledger log: {0}")]
    Writer(#[from] WriterError),
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("a blocking task failed: {0}")]
    Blocking(String),
    #[error("the connection holding the sequencer's lock ended")]
    LockLost,
}

impl From<BlockingFailed> for SequencerError {
    fn from(e: BlockingFailed) -> Self {
        Self::Blocking(e.0)
    }
}

/// [`run`] on the current runtime, stopped by [`SequencerTask::stop`]: how a
/// node (and the benchmark) keeps one.
#[derive(Debug)]
pub struct SequencerTask {
    pub progress: Arc<SequencerProgress>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl SequencerTask {
    pub fn spawn(settings: SequencerSettings, signer: NoteSigner) -> Self {
        let progress = Arc::new(SequencerProgress::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(settings, signer, Arc::clone(&progress), async move {
            let _ = stopped.await;
        }));
        Self {
            progress,
            stop,
            task,
        }
    }

    /// Stops it (releasing the lead if it had it) and waits until it has.
    pub async fn stop(self) -> Result<(), SequencerError> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| SequencerError::Blocking(e.to_string()))
    }
}

/// Leads whenever it can until `shutdown` completes: a node that does not hold
/// the lock waits as a standby; a leader that fails lets go and tries again.
pub async fn run(
    settings: SequencerSettings,
    signer: NoteSigner,
    progress: Arc<SequencerProgress>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let outcome = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = lead(&settings, &signer, &progress) => r,
        };
        progress.leading.store(false, Ordering::SeqCst);
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "sequencer stopped leading; will try again");
        }
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = tokio::time::sleep(settings.standby_retry) => {}
        }
    }
    progress.leading.store(false, Ordering::SeqCst);
}

/// One term: returns `Ok` at once if another node leads, otherwise runs until
/// something fails (a lost connection, a fence, a broker error).
async fn lead(
    settings: &SequencerSettings,
    signer: &NoteSigner,
    progress: &SequencerProgress,
) -> Result<(), SequencerError> {
    // The lock lives as long as this connection: when it ends, the term ends.
    let Some((client, mut lost)) =
        super::try_lead(&settings.cluster.postgres, SEQUENCER_LOCK, "sequencer").await?
    else {
        return Ok(());
    };
    let epoch: i64 = client
        .query_one(
            "update ledger_head set sequencer_epoch = sequencer_epoch + 1 returning sequencer_epoch",
            &[],
        )
        .await?
        .get(0);
    progress.terms.fetch_add(1, Ordering::SeqCst);
    progress.leading.store(true, Ordering::SeqCst);
    tracing::info!(epoch, "leading the ledger's sequencer");

    let topic = settings.topic();
    let partitions = settings.cluster.ledger_partitions;
    let projection = PgProjection::new(&client, &topic);
    let mut sequencer = Sequencer::open(&projection, partitions).await?;
    let store = PgLogStore::connect(&settings.cluster.postgres).await?;
    let (signer, previous) = (signer.clone(), settings.previous_log_key.clone());
    let writer =
        blocking(move || LogWriter::open_rotated(store, signer, previous.as_ref())).await??;
    progress
        .published
        .store(writer.published().size, Ordering::SeqCst);
    let mut writer = Some(writer);
    let mut unappended = Unappended::default();
    let mut publishing: Option<tokio::task::JoinHandle<Publish>> = None;
    let (brokers, feed_topic) = (settings.cluster.kafka_brokers.clone(), topic.clone());
    let feed_client = format!("{}-sequencer-feed", settings.cluster.topic_prefix);
    let feed = blocking(move || LedgerFeed::open(&brokers, &feed_topic, partitions, &feed_client))
        .await??;
    // Opening the order log fences any earlier leader's writer of it.
    let order_config = KafkaLogConfig::sequencer(&settings.cluster);
    let order_log = blocking(move || KafkaLog::open(order_config)).await??;
    let mut positions = projection.positions().await?;
    let mut last_publish = Instant::now();
    progress
        .tree_size
        .store(sequencer.tree_size(), Ordering::SeqCst);

    // The next round's read runs while this round's batch is applied: it
    // starts from where this read ended, whatever the apply does (a failed
    // apply ends the term, and the next term reads the stored positions).
    let max = settings.batch_per_partition;
    let mut empty_rounds: u32 = 0;
    let mut reading = tokio::task::spawn_blocking({
        let from = positions.clone();
        move || poll(feed, &from, max)
    });
    loop {
        if lost.try_recv().is_ok() {
            return Err(SequencerError::LockLost);
        }
        let (feed, polled) = reading
            .await
            .map_err(|e| SequencerError::Blocking(e.to_string()))?;
        let (batch, read_to) = polled?;
        let caught_up = read_to.is_empty();
        positions.extend(read_to.iter().map(|(p, n)| (*p, *n)));
        let from = positions.clone();
        if caught_up {
            empty_rounds = empty_rounds.saturating_add(1);
            tokio::time::sleep(settings.idle.after(empty_rounds)).await;
        } else {
            empty_rounds = 0;
        }
        reading = tokio::task::spawn_blocking(move || poll(feed, &from, max));
        if !caught_up {
            let applied = sequencer
                .apply(&projection, Some(&order_log), batch, &read_to)
                .await?;
            unappended.push(applied);
            progress
                .tree_size
                .store(sequencer.tree_size(), Ordering::SeqCst);
        }
        // A finished publish hands the writer back.
        if publishing
            .as_ref()
            .is_some_and(tokio::task::JoinHandle::is_finished)
        {
            let (w, published) = publishing
                .take()
                .expect("just checked")
                .await
                .map_err(|e| SequencerError::Blocking(e.to_string()))?;
            progress.published.store(published?, Ordering::SeqCst);
            writer = Some(w);
        }
        // Integration, unless a publish holds the writer: it runs on the
        // blocking pool while the next rounds are sequenced, and what it did
        // not cover is appended and published after it.
        if let Some(mut w) = writer.take() {
            unappended
                .append_to(&client, &mut w, sequencer.tree_size())
                .await?;
            let unpublished = w.size() > w.published().size;
            if unpublished && (caught_up || last_publish.elapsed() >= settings.checkpoint_interval)
            {
                last_publish = Instant::now();
                publishing = Some(tokio::task::spawn_blocking(move || {
                    let r = w.publish().map(|c| c.size);
                    (w, r)
                }));
            } else {
                writer = Some(w);
            }
        }
    }
}

/// A publish's writer, handed back, and the size it published.
type Publish = (LogWriter<PgLogStore>, Result<u64, WriterError>);

type Polled = Result<(Checked, BTreeMap<i32, i64>), SequencerError>;

/// One read of every partition, decoded and its receipts' signatures checked
/// (on the blocking pool, while the previous round is applied), handing the
/// feed back for the next one.
fn poll(mut feed: LedgerFeed, from: &BTreeMap<i32, i64>, max: usize) -> (LedgerFeed, Polled) {
    let polled = feed.poll(from, max).map_err(SequencerError::from).and_then(
        |(batch, directory, read_to)| {
            Ok((Checked::check(batch)?.with_directory(directory), read_to))
        },
    );
    (feed, polled)
}

/// Entries committed to Postgres that the log writer has not been given yet,
/// kept so that it need not read them back. Bounded: past
/// [`UNAPPENDED_MAX_ENTRIES`] the oldest are dropped, and read back from
/// Postgres (which holds every committed entry) when the writer catches up.
#[derive(Debug, Default)]
pub(crate) struct Unappended {
    /// The leaf index of `entries[0]`.
    from: u64,
    entries: Vec<Vec<u8>>,
}

impl Unappended {
    /// Keeps what a round committed.
    pub(crate) fn push(&mut self, applied: Applied) {
        let first = applied.tree_size - applied.sequenced;
        let contiguous = self.from + self.entries.len() as u64 == first;
        if self.entries.is_empty()
            || !contiguous
            || self.entries.len() + applied.entries.len() > UNAPPENDED_MAX_ENTRIES
        {
            self.entries.clear();
            self.from = first;
        }
        self.entries.extend(applied.entries);
    }

    /// Gives the writer every committed entry up to `tree_size`: from
    /// Postgres up to the first one kept here, then these.
    pub(crate) async fn append_to(
        &mut self,
        client: &tokio_postgres::Client,
        writer: &mut LogWriter<PgLogStore>,
        tree_size: u64,
    ) -> Result<(), SequencerError> {
        let kept_from = if self.entries.is_empty() {
            tree_size
        } else {
            self.from
        };
        assert!(
            writer.size() <= kept_from,
            "the writer is only given committed entries, once"
        );
        append_sequenced(client, writer, kept_from).await?;
        for entry in self.entries.drain(..) {
            writer.append(entry)?;
        }
        assert_eq!(
            writer.size(),
            tree_size,
            "the writer has every committed entry"
        );
        Ok(())
    }
}

/// Appends to the writer every entry Postgres holds past what it has, up to
/// `tree_size`.
pub(crate) async fn append_sequenced(
    client: &tokio_postgres::Client,
    writer: &mut LogWriter<PgLogStore>,
    tree_size: u64,
) -> Result<(), SequencerError> {
    while writer.size() < tree_size {
        let from = i64::try_from(writer.size()).unwrap_or(i64::MAX);
        let to = (from + INTEGRATE_BATCH_ENTRIES).min(i64::try_from(tree_size).unwrap_or(i64::MAX));
        let rows = crate::cluster::ledger_store::entries_between(client, from, to).await?;
        for row in rows {
            let index: i64 = row.get(0);
            assert_eq!(
                u64::try_from(index).ok(),
                Some(writer.size()),
                "ledger entries are gap-free"
            );
            writer.append(row.get(1))?;
        }
        if writer.size() < u64::try_from(to).unwrap_or(u64::MAX) {
            return Err(SequencerError::Projection(ProjectionError::Entry {
                partition: -1,
                offset: -1,
                why: format!("leaf {} is missing", writer.size()),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(tree_size: u64, count: u64) -> Applied {
        Applied {
            sequenced: count,
            skipped: 0,
            tree_size,
            entries: (tree_size - count..tree_size)
                .map(|i| i.to_be_bytes().to_vec())
                .collect(),
        }
    }

    #[test]
    fn unappended_entries_stay_contiguous_and_bounded() {
        let mut u = Unappended::default();
        u.push(applied(10, 4));
        u.push(applied(12, 2));
        assert_eq!(u.from, 6);
        assert_eq!(u.entries.len(), 6);
        assert_eq!(u.entries[5], 11u64.to_be_bytes().to_vec());
        // A round that committed nothing new changes nothing.
        u.push(applied(12, 0));
        assert_eq!((u.from, u.entries.len()), (6, 6));
        // Past the bound, only the newest round is kept; the rest is read back.
        let big = UNAPPENDED_MAX_ENTRIES as u64;
        u.push(applied(12 + big, big));
        assert_eq!((u.from, u.entries.len() as u64), (12, big));
        u.push(applied(13 + big, 1));
        assert_eq!((u.from, u.entries.len() as u64), (12 + big, 1));
    }
}
