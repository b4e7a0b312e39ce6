//! `troop-coordinator replay` (CLUSTER.md, "Replay"): rebuilds the ledger's
//! projections from Kafka alone into an empty database, and compares them with
//! a live one.
//!
//! Kafka is the source of truth: the ledger partitions hold every judged
//! event, and `troop.sequence` holds the sequencer's decisions (which record
//! is leaf *i*). Replay follows those decisions instead of deciding again, so
//! it reproduces the live order exactly, and runs the same code as the live
//! sequencer on it: [`Checked::check`] (every receipt signature), the fold and
//! [`Sequencer::apply`] (balances, holds, receipts, snapshots), then the same
//! integration (tiles and signed checkpoints). What it rebuilds is therefore
//! what the live system would hold had it never lost a row.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use troop_ledger::hash::Hash;
use troop_ledger::merkle;
use troop_ledger::note::{Checkpoint, NoteSigner, NoteVerifier};
use troop_ledger::tile::TileHashReader;
use troop_ledger::writer::LogWriter;

use crate::cluster::blocking;
use crate::cluster::kafka_log::TopicReader;
use crate::cluster::ledger_store::{PgLogStore, read_file};
use crate::cluster::projection::{Checked, Sequencer, Sourced};
use crate::cluster::projection_store::PgProjection;
use crate::cluster::sequence_log::{Order, OrderError, OrderRecord};
use crate::cluster::sequencer::{SequencerError, Unappended};
use crate::config::ClusterConfig;
use crate::eventlog::EventLogError;

/// Leaves read, checked and applied per round: bounds replay's memory
/// whatever the ledger's length (a few MiB of entries).
pub const REPLAY_BATCH_LEAVES: usize = 4_096;
/// Records of `troop.sequence` read per fetch.
const ORDER_READ_RECORDS: usize = 4_096;
/// Records of a ledger partition read per fetch when replaying the directory.
const DIRECTORY_READ_RECORDS: usize = 4_096;
/// A checkpoint is published at least every this many leaves, so that the
/// writer never holds more than this many unpublished entries.
const PUBLISH_EVERY_LEAVES: u64 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Sequencer(#[from] SequencerError),
    #[error("troop.sequence: {0}")]
    Order(#[from] OrderError),
    #[error("kafka: {0}")]
    Kafka(#[from] EventLogError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "the target database already holds a ledger ({0} entries): replay only into a freshly migrated one"
    )]
    NotEmpty(u64),
    #[error(
        "leaf {leaf} is record {number} of ledger partition {partition}, which {why}: the log and its order disagree"
    )]
    Missing {
        leaf: u64,
        partition: i32,
        number: u64,
        why: &'static str,
    },
    #[error("leaf {leaf} names a record an earlier leaf holds already")]
    Repeated { leaf: u64 },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

impl From<crate::cluster::BlockingFailed> for ReplayError {
    fn from(e: crate::cluster::BlockingFailed) -> Self {
        Self::Sequencer(e.into())
    }
}

impl From<crate::cluster::projection::ProjectionError> for ReplayError {
    fn from(e: crate::cluster::projection::ProjectionError) -> Self {
        Self::Sequencer(e.into())
    }
}

/// The order decided on `<prefix>.sequence`, every committed record of it.
/// Blocks on the broker: call it off the async runtime.
pub fn read_order(cluster: &ClusterConfig) -> Result<Order, ReplayError> {
    let mut reader = TopicReader::open(
        &cluster.kafka_brokers,
        &cluster.topic("sequence"),
        &format!("{}-replay-order", cluster.topic_prefix),
    )?;
    let mut order = Order::default();
    let mut next = 0;
    loop {
        let records = reader
            .read_visible(&BTreeMap::from([(0, next)]), ORDER_READ_RECORDS)?
            .remove(&0)
            .unwrap_or_default();
        let Some(last) = records.last() else {
            return Ok(order);
        };
        next = last.offset + 1;
        for r in &records {
            order.push(&OrderRecord::decode(&r.payload)?)?;
        }
    }
}

/// Reads the entries of `leaves` (leaf `first_leaf` on) from the ledger
/// partitions. A partition's leaves name its records in ascending order, so
/// each partition is read forward, once per round, from its first leaf's
/// record to its last's; the records between that are not leaves (keys,
/// records of other partitions' owners) are read past.
fn read_entries(
    reader: &mut TopicReader,
    first_leaf: u64,
    leaves: &[(i32, u64)],
) -> Result<Vec<Sourced>, ReplayError> {
    let mut spans: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for &(partition, number) in leaves {
        let span = spans.entry(partition).or_insert((number, number));
        span.0 = span.0.min(number);
        span.1 = span.1.max(number);
    }
    let mut found: HashMap<(i32, u64), Vec<u8>> = HashMap::with_capacity(leaves.len());
    for (&partition, &(first, last)) in &spans {
        let mut next = first;
        while next <= last {
            let want = usize::try_from(last - next + 1).unwrap_or(usize::MAX);
            let records = reader.read(partition, next, want, last + 1)?;
            let Some(end) = records.last().map(|r| r.offset + 1) else {
                break;
            };
            for r in records {
                found.insert((partition, r.offset), r.payload);
            }
            next = end;
        }
    }
    let mut batch = Vec::with_capacity(leaves.len());
    for (i, &(partition, number)) in leaves.iter().enumerate() {
        let leaf = first_leaf + i as u64;
        let missing = |why| ReplayError::Missing {
            leaf,
            partition,
            number,
            why,
        };
        let payload = found
            .remove(&(partition, number))
            .ok_or_else(|| missing("is not in the partition (or an earlier leaf took it)"))?;
        let Some((&crate::books::TAG_LEDGER_ENTRY, entry)) = payload.split_first() else {
            return Err(missing("is not a ledger entry"));
        };
        batch.push(Sourced {
            partition,
            offset: i64::try_from(number).unwrap_or(i64::MAX),
            entry: entry.to_vec(),
        });
    }
    Ok(batch)
}

/// What replay rebuilt.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The checkpoint it published (signed with the network's ledger key).
    pub checkpoint: Checkpoint,
    /// Leaves the records of `troop.sequence` decide.
    pub leaves: u64,
    /// Directory records (API keys issued and revoked, bans) projected.
    pub directory: usize,
    pub seconds: f64,
}

/// Rebuilds into `into` (a migrated database with an empty ledger) every
/// projection the sequencer keeps, from the ledger partitions and the order on
/// `troop.sequence` of `cluster`, and publishes the ledger signed by `signer`.
pub async fn replay(
    cluster: &ClusterConfig,
    into: &str,
    signer: NoteSigner,
) -> Result<Replayed, ReplayError> {
    let started = Instant::now();
    let mut client = super::connect(into, "replay").await?;
    let topic = cluster.topic("ledger");
    let projection = PgProjection::new(&client, &topic);
    let mut sequencer = Sequencer::open(&projection, cluster.ledger_partitions).await?;
    let has_checkpoint = read_file(&client, troop_ledger::store::CHECKPOINT_PATH)
        .await?
        .is_some();
    if sequencer.tree_size() > 0 || has_checkpoint {
        return Err(ReplayError::NotEmpty(sequencer.tree_size()));
    }
    let order = {
        let cluster = cluster.clone();
        blocking(move || read_order(&cluster)).await??
    };
    tracing::info!(leaves = order.len(), "replaying the ledger from kafka");
    let store = PgLogStore::connect(into).await?;
    let mut writer = blocking(move || LogWriter::open(store, signer))
        .await?
        .map_err(SequencerError::from)?;
    let mut unappended = Unappended::default();
    let mut reader = {
        let (brokers, topic) = (cluster.kafka_brokers.clone(), topic.clone());
        let client_id = format!("{}-replay", cluster.topic_prefix);
        blocking(move || TopicReader::open(&brokers, &topic, &client_id)).await??
    };
    for chunk in order.leaves().chunks(REPLAY_BATCH_LEAVES) {
        let first_leaf = sequencer.tree_size();
        let leaves = chunk.to_vec();
        let (back, checked) = blocking(move || {
            let batch = read_entries(&mut reader, first_leaf, &leaves)
                .and_then(|b| Checked::check(b).map_err(ReplayError::from));
            (reader, batch)
        })
        .await?;
        reader = back;
        let checked = checked?;
        // Every record read up to the chunk's last leaf in each partition.
        let mut read_to: BTreeMap<i32, i64> = BTreeMap::new();
        for &(partition, number) in chunk {
            let next = i64::try_from(number + 1).unwrap_or(i64::MAX);
            let at = read_to.entry(partition).or_insert(next);
            *at = (*at).max(next);
        }
        let applied = sequencer
            .apply(&projection, None, checked, &read_to)
            .await?;
        if applied.skipped > 0 {
            return Err(ReplayError::Repeated {
                leaf: first_leaf + applied.sequenced,
            });
        }
        unappended.push(applied);
        unappended
            .append_to(&client, &mut writer, sequencer.tree_size())
            .await?;
        if writer.size() - writer.published().size >= PUBLISH_EVERY_LEAVES {
            writer = publish(writer).await?;
        }
    }
    let writer = publish(writer).await?;
    let directory = replay_directory(cluster, &mut client, reader).await?;
    tracing::info!(
        records = directory,
        "replayed the directory (API keys, bans)"
    );
    Ok(Replayed {
        checkpoint: writer.published().clone(),
        leaves: order.len(),
        directory,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Projects the directory (API keys and bans) from every ledger partition,
/// each read to its end in its own order, as the sequencer does: a key's
/// issue and revocation are both in its account's partition and a ban in
/// its worker's, so per-partition order is all the projection needs (its
/// writes are idempotent). Returns the records projected. A second read of
/// the partitions: the leaves' reads above skip what follows a partition's
/// last leaf.
async fn replay_directory(
    cluster: &ClusterConfig,
    client: &mut tokio_postgres::Client,
    mut reader: TopicReader,
) -> Result<usize, ReplayError> {
    let partitions = cluster.ledger_partitions;
    let mut projected = 0;
    for p in 0..partitions {
        let partition = i32::try_from(p).unwrap_or(i32::MAX);
        let (back, end) = blocking(move || {
            let end = reader.end(partition);
            (reader, end)
        })
        .await?;
        reader = back;
        let end = end?;
        let mut next = 0u64;
        while next < end {
            let (back, read) = blocking(move || {
                let read = reader.read(partition, next, DIRECTORY_READ_RECORDS, end);
                (reader, read)
            })
            .await?;
            reader = back;
            let records = read?;
            let Some(last) = records.last().map(|r| r.offset) else {
                break;
            };
            let mut directory = Vec::new();
            for r in &records {
                match crate::directory::Directory::from_record(&r.payload) {
                    Some(Ok(d)) => directory.push(d),
                    // As the sequencer's feed does.
                    Some(Err(why)) => {
                        tracing::error!(partition, offset = r.offset, %why, "a directory record that does not parse is skipped");
                    }
                    None => {}
                }
            }
            if !directory.is_empty() {
                let tx = client.transaction().await?;
                crate::cluster::directory::project(&tx, &directory).await?;
                tx.commit().await?;
                projected += directory.len();
            }
            next = last + 1;
        }
    }
    Ok(projected)
}

async fn publish(mut writer: LogWriter<PgLogStore>) -> Result<LogWriter<PgLogStore>, ReplayError> {
    let (writer, published) = blocking(move || {
        let r = writer.publish().map(|_| ());
        (writer, r)
    })
    .await?;
    published.map_err(SequencerError::from)?;
    Ok(writer)
}

/// What a database's ledger projections hold, reduced to digests to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerState {
    /// Entries sequenced (`ledger_head`).
    pub tree_size: u64,
    /// The published checkpoint, its signature checked.
    pub checkpoint: Option<Checkpoint>,
    /// BLAKE3 of each table's rows in key order, by table name.
    pub tables: BTreeMap<&'static str, Hash>,
}

/// Each projection table replay rebuilds, as a query of its rows in key
/// order (every column as text: numeric(39,0) has no binary Rust type here).
const TABLES: [(&str, &str); 8] = [
    (
        "ledger_entries",
        "select leaf_index::text, partition_id::text, event_offset::text, encode(entry, 'hex')
         from ledger_entries order by leaf_index",
    ),
    (
        "accounts",
        "select account, coalesce(role, ''), ledger_partition::text, debits_posted::text,
         credits_posted::text, debits_pending::text, external_credits::text
         from accounts order by account",
    ),
    (
        "holds",
        "select hold, account, job, model, amount_micro::text, expires_at_ms::text,
         coalesce(schedule_version::text, ''), coalesce(origin_node, '')
         from holds order by hold",
    ),
    (
        "receipts",
        "select job, leaf_index::text, consumer, worker, charged_micro::text,
         worker_earned_micro::text, fee_micro::text from receipts order by job",
    ),
    (
        "worker_registrations",
        "select worker, encode(worker_key, 'hex'), account
         from worker_registrations order by worker",
    ),
    (
        "network_entries",
        "select leaf_index::text from network_entries order by leaf_index",
    ),
    // Change numbers are left out: they order one database's changes for
    // its readers, and differ between two databases by nature.
    (
        "api_keys",
        "select key_id, account, encode(secret_hash, 'hex'), revoked::text
         from api_keys order by key_id",
    ),
    (
        "bans",
        "select worker, at_ms::text from bans order by worker",
    ),
];

/// Reads `client`'s ledger state; the checkpoint must verify with `verifier`.
pub async fn ledger_state(
    client: &tokio_postgres::Client,
    verifier: &NoteVerifier,
) -> Result<LedgerState, ReplayError> {
    use futures_util::TryStreamExt as _;
    let tree_size: i64 = client
        .query_one("select tree_size from ledger_head", &[])
        .await?
        .get(0);
    let checkpoint = match read_file(client, troop_ledger::store::CHECKPOINT_PATH).await? {
        None => None,
        Some(note) => {
            let text = std::str::from_utf8(&note)
                .map_err(|_| ReplayError::Checkpoint("not UTF-8".into()))?;
            let body = verifier
                .open(text)
                .map_err(|e| ReplayError::Checkpoint(e.to_string()))?;
            Some(Checkpoint::parse(body).map_err(|e| ReplayError::Checkpoint(e.to_string()))?)
        }
    };
    let mut tables = BTreeMap::new();
    for (name, query) in TABLES {
        let rows = client.query_raw(query, std::iter::empty::<&str>()).await?;
        tokio::pin!(rows);
        let mut hasher = blake3::Hasher::new();
        while let Some(row) = rows.try_next().await? {
            for i in 0..row.len() {
                let column: &str = row.get(i);
                // Length-prefixed: no two different rows hash alike.
                hasher.update(&(column.len() as u64).to_le_bytes());
                hasher.update(column.as_bytes());
            }
        }
        tables.insert(name, Hash(*hasher.finalize().as_bytes()));
    }
    Ok(LedgerState {
        tree_size: u64::try_from(tree_size).unwrap_or(0),
        checkpoint,
        tables,
    })
}

/// How a replayed database differs from the live one; empty when replay
/// reproduced it. The live checkpoint may be older than the live tree (it is
/// published about every second): the replayed tree's root at the live
/// checkpoint's size is computed from the replayed tiles (which blocks on
/// Postgres: call it off the async runtime).
pub fn differences(
    live: &LedgerState,
    replayed: &LedgerState,
    replayed_store: &PgLogStore,
) -> Result<Vec<String>, ReplayError> {
    let mut out = Vec::new();
    if live.tree_size != replayed.tree_size {
        out.push(format!(
            "the live ledger has {} entries, troop.sequence decides {}{}",
            live.tree_size,
            replayed.tree_size,
            if live.tree_size < replayed.tree_size {
                " (a leader's last decision not yet committed in Postgres, or rows lost there)"
            } else {
                " (entries Postgres holds that Kafka does not decide)"
            }
        ));
    }
    for (name, digest) in &live.tables {
        if replayed.tables.get(name) != Some(digest) {
            out.push(format!("table {name} differs"));
        }
    }
    match (&live.checkpoint, &replayed.checkpoint) {
        (Some(l), Some(r)) if l.size <= r.size => {
            let size = r.size;
            let root = if l.size == size {
                r.root
            } else {
                let store_root = {
                    let reader = TileHashReader::new(replayed_store, size);
                    merkle::tree_hash(&reader, l.size)
                };
                store_root.map_err(|e| ReplayError::Checkpoint(e.to_string()))?
            };
            if root != l.root {
                out.push(format!(
                    "the live checkpoint's root at {} entries is not the replayed tree's",
                    l.size
                ));
            }
        }
        (Some(l), Some(r)) => out.push(format!(
            "the live checkpoint covers {} entries, the replayed one {}",
            l.size, r.size
        )),
        (Some(_), None) => {
            out.push("nothing was replayed, yet the live ledger is published".into())
        }
        (None, _) => {}
    }
    Ok(out)
}

/// Compares the database `replayed` (after [`replay`]) with the live one:
/// both states, and how they differ (empty when they agree).
pub async fn compare(
    live: &str,
    replayed: &str,
    verifier: &NoteVerifier,
) -> Result<(LedgerState, LedgerState, Vec<String>), ReplayError> {
    let live_state = ledger_state(&super::connect(live, "replay").await?, verifier).await?;
    let replayed_state = ledger_state(&super::connect(replayed, "replay").await?, verifier).await?;
    let store = PgLogStore::connect(replayed).await?;
    let (l, r) = (live_state.clone(), replayed_state.clone());
    let diffs = blocking(move || differences(&l, &r, &store)).await??;
    Ok((live_state, replayed_state, diffs))
}
