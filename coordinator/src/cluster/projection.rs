//! The sequencer's projection into Postgres (CLUSTER.md, "The ledger: one
//! sequencer, fenced"): batches of judged ledger events, read from the ledger
//! partitions, get their leaf indexes and are applied to the balance tables
//! in one transaction together with the consumer offsets they came from.
//!
//! The balances are computed by the same pure fold as everywhere else (an
//! in-memory [`Ledger`] that mirrors the tables); Postgres only stores what the
//! fold says, for every node to read. A second sequencer is fenced by a
//! compare-and-swap on the tree size; a redelivered event (same id) is skipped.

use std::collections::{BTreeMap, BTreeSet};

use troop_ledger::fold::{FoldError, Ledger};
use troop_ledger::receipt::{self, KeyCache, ReceiptError};
use troop_schemas::{AccountId, Event, HoldId, decode_entry, decode_entry_spans};

use crate::cluster::sequence_log::OrderRecord;
use crate::directory::Directory;

/// The consumer group whose offsets the sequencer keeps in Postgres.
pub const SEQUENCER_GROUP: &str = "troop-sequencer";

/// The ledger partition an account's events go to. Computed here, never left
/// to a client's partitioner (librdkafka's and Java's differ).
pub fn partition_of(account: &AccountId, partitions: u32) -> u32 {
    partition_of_key(&account.to_string(), partitions)
}

/// The partition of any key (an account's, a worker's) as text.
pub fn partition_of_key(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has partitions");
    let digest = blake3::hash(key.as_bytes());
    let head = u64::from_be_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"));
    u32::try_from(head % u64::from(partitions)).expect("below a u32")
}

/// Reads every ledger partition from where the sequencer stopped, with one
/// consumer (one fetch asks for every partition).
#[derive(Debug)]
pub struct LedgerFeed {
    partitions: u32,
    reader: crate::cluster::kafka_log::TopicReader,
}

impl LedgerFeed {
    pub fn open(
        brokers: &str,
        topic: &str,
        partitions: u32,
    ) -> Result<Self, crate::eventlog::EventLogError> {
        Ok(Self {
            partitions,
            reader: crate::cluster::kafka_log::TopicReader::open(brokers, topic)?,
        })
    }

    /// Up to `max_per_partition` committed records of each partition after
    /// `positions` (next record numbers; absent means from the start):
    /// the ledger entries among them, the directory records (keys, bans),
    /// and how far each partition was read. Blocks on the broker: call it
    /// off the async runtime.
    pub fn poll(
        &mut self,
        positions: &BTreeMap<i32, i64>,
        max_per_partition: usize,
    ) -> Result<Fed, crate::eventlog::EventLogError> {
        let from: BTreeMap<i32, u64> = (0..self.partitions)
            .map(|p| {
                let partition = i32::try_from(p).unwrap_or(i32::MAX);
                let from = positions.get(&partition).copied().unwrap_or(0);
                (partition, u64::try_from(from).unwrap_or(0))
            })
            .collect();
        let mut batch = Vec::new();
        let mut directory = Vec::new();
        let mut read_to = BTreeMap::new();
        // Partition by partition, in order: the batch's order is deterministic.
        for (partition, records) in self.reader.read_visible(&from, max_per_partition)? {
            let Some(last) = records.last() else { continue };
            read_to.insert(
                partition,
                i64::try_from(last.offset + 1).unwrap_or(i64::MAX),
            );
            for r in records {
                if r.payload.first() != Some(&crate::books::TAG_LEDGER_ENTRY) {
                    // Not a leaf: a directory record is projected beside the
                    // batch; anything else only moves the position.
                    match Directory::from_record(&r.payload) {
                        Some(Ok(d)) => directory.push(d),
                        Some(Err(why)) => {
                            // Its owner wrote it; the ledger must not stop for it.
                            tracing::error!(partition, offset = r.offset, %why, "a directory record that does not parse is skipped");
                        }
                        None => {}
                    }
                    continue;
                }
                batch.push(Sourced {
                    partition,
                    offset: i64::try_from(r.offset).unwrap_or(i64::MAX),
                    entry: r.payload[1..].to_vec(),
                });
            }
        }
        Ok((batch, directory, read_to))
    }
}

/// One poll: the ledger entries, the directory records, how far each
/// partition was read.
pub type Fed = (Vec<Sourced>, Vec<Directory>, BTreeMap<i32, i64>);

/// One judged event as the sequencer read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced {
    /// With `offset`, the event's id: a partition has one writer at a time
    /// (fenced) and numbers its records without gaps, so a redelivered record
    /// has the same (partition, offset), and the ledger holds each once.
    pub partition: i32,
    pub offset: i64,
    /// The canonical ledger entry.
    pub entry: Vec<u8>,
}

/// A batch whose every entry decodes and whose every receipt's two signatures
/// verify over the bytes as logged. Only [`Checked::check`] makes one, so the
/// sequencer never sequences an entry an auditor would refuse: the ledger is
/// append-only, and one bad signature in it would fail every audit for good.
#[derive(Debug, Default)]
pub struct Checked {
    items: Vec<(Sourced, Event)>,
    /// Keys and bans read with the batch, projected in its transaction.
    directory: Vec<Directory>,
}

impl Checked {
    /// Decodes `batch` and verifies its receipts' signatures in batches on all
    /// cores. CPU-bound (two Ed25519 checks per settlement): call it off the
    /// async runtime.
    pub fn check(batch: Vec<Sourced>) -> Result<Self, ProjectionError> {
        let mut keys = KeyCache::default();
        let mut signatures = Vec::new();
        // The item each signature belongs to, to name a bad one.
        let mut signed_by = Vec::new();
        let mut items = Vec::with_capacity(batch.len());
        for s in batch {
            let (event, pair) = {
                let (event, members) =
                    decode_entry_spans(&s.entry).map_err(|e| ProjectionError::Entry {
                        partition: s.partition,
                        offset: s.offset,
                        why: e.to_string(),
                    })?;
                let pair = receipt::entry_receipt_signatures(&s.entry, &members, &event, &mut keys)
                    .map_err(|source| ProjectionError::Receipt {
                        partition: s.partition,
                        offset: s.offset,
                        source,
                    })?;
                (event, pair)
            };
            if let Some(pair) = pair {
                signed_by.extend([items.len(); 2]);
                signatures.extend(pair);
            }
            items.push((s, event));
        }
        receipt::verify_all(&signatures).map_err(|(pos, source)| {
            let (s, _) = &items[signed_by[pos]];
            ProjectionError::Receipt {
                partition: s.partition,
                offset: s.offset,
                source,
            }
        })?;
        Ok(Self {
            items,
            directory: Vec::new(),
        })
    }

    /// The batch with the directory records read beside it.
    #[must_use]
    pub fn with_directory(mut self, directory: Vec<Directory>) -> Self {
        self.directory = directory;
        self
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "another sequencer moved the ledger to {found} entries (this one had {expected}); stopping"
    )]
    Fenced { expected: u64, found: u64 },
    #[error("entry at partition {partition} offset {offset}: {why}")]
    Entry {
        partition: i32,
        offset: i64,
        why: String,
    },
    #[error("receipt at partition {partition} offset {offset}: {source}; stopping")]
    Receipt {
        partition: i32,
        offset: i64,
        source: ReceiptError,
    },
    #[error("the fold refused an event its owner accepted ({0}); stopping")]
    Refused(FoldError),
    #[error("the order log: {0}")]
    OrderLog(#[from] crate::eventlog::EventLogError),
    #[error("a batch failed after the fold moved: reopen from postgres")]
    Poisoned,
}

/// What one batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub sequenced: u64,
    /// Redeliveries of events already in the ledger.
    pub skipped: u64,
    pub tree_size: u64,
    /// The entries committed, leaves `tree_size - sequenced ..`, handed to the
    /// log writer without reading them back from Postgres.
    pub entries: Vec<Vec<u8>>,
}

/// Accounts and holds an event changes, read before it is applied (a
/// settlement names its hold, and the hold its account).
fn touched(event: &Event, ledger: &Ledger) -> (Vec<AccountId>, Option<HoldId>) {
    let hold_account = |hold: &HoldId| ledger.hold(hold).map(|h| h.account);
    let worker_account = |w| ledger.worker(w).map(|w| w.account);
    match event {
        Event::AccountOpened { account, .. } => (vec![*account], None),
        Event::Grant { account, .. } => (vec![AccountId::TREASURY, *account], None),
        Event::HoldPlaced { hold, account, .. } => (vec![*account], Some(*hold)),
        Event::HoldSettled { hold, receipt, .. } => (
            [
                hold_account(hold),
                worker_account(&receipt.receipt.worker),
                Some(AccountId::TREASURY),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Some(*hold),
        ),
        Event::HoldVoided { hold, .. } | Event::HoldExpired { hold, .. } => {
            (hold_account(hold).into_iter().collect(), Some(*hold))
        }
        Event::Transfer { from, to, .. } => (vec![*from, *to], None),
        Event::UptimeReward { worker, .. } => (
            [worker_account(worker), Some(AccountId::TREASURY)]
                .into_iter()
                .flatten()
                .collect(),
            None,
        ),
        Event::WorkerRegistered { .. }
        | Event::PriceSchedulePublished { .. }
        | Event::KeyRotated { .. }
        | Event::BalanceSnapshot { .. } => (Vec::new(), None),
    }
}

fn numeric(v: u128) -> String {
    v.to_string()
}

/// One batch's new rows, column by column, written with one statement per table.
#[derive(Default)]
struct Rows<'a> {
    leaf: Vec<i64>,
    partition: Vec<i32>,
    offset: Vec<i64>,
    entry: Vec<&'a [u8]>,
    receipt_job: Vec<String>,
    receipt_leaf: Vec<i64>,
    receipt_consumer: Vec<String>,
    receipt_worker: Vec<String>,
    /// Charged, worker earned, fee.
    receipt_amounts: Vec<[i64; 3]>,
    registered_worker: Vec<String>,
    registered_key: Vec<&'a [u8]>,
    registered_account: Vec<String>,
    /// Leaves that publish prices or keys: every node reads them whole.
    network_leaf: Vec<i64>,
}

impl<'a> Rows<'a> {
    fn entry(&mut self, index: i64, s: &'a Sourced) {
        self.leaf.push(index);
        self.partition.push(s.partition);
        self.offset.push(s.offset);
        self.entry.push(&s.entry);
    }

    async fn write(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        if self.leaf.is_empty() {
            return Ok(());
        }
        tx.execute(
            "insert into ledger_entries (leaf_index, partition_id, event_offset, entry)
             select * from unnest($1::bigint[], $2::int[], $3::bigint[], $4::bytea[])",
            &[&self.leaf, &self.partition, &self.offset, &self.entry],
        )
        .await?;
        if !self.receipt_job.is_empty() {
            let column = |i: usize| {
                self.receipt_amounts
                    .iter()
                    .map(|a| a[i])
                    .collect::<Vec<_>>()
            };
            tx.execute(
                "insert into receipts (job, leaf_index, consumer, worker, charged_micro, worker_earned_micro, fee_micro)
                 select * from unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[])",
                &[&self.receipt_job, &self.receipt_leaf, &self.receipt_consumer, &self.receipt_worker, &column(0), &column(1), &column(2)],
            )
            .await?;
        }
        if !self.network_leaf.is_empty() {
            tx.execute(
                "insert into network_entries (leaf_index) select * from unnest($1::bigint[])",
                &[&self.network_leaf],
            )
            .await?;
        }
        if !self.registered_worker.is_empty() {
            tx.execute(
                "insert into worker_registrations (worker, worker_key, account)
                 select * from unnest($1::text[], $2::bytea[], $3::text[])",
                &[
                    &self.registered_worker,
                    &self.registered_key,
                    &self.registered_account,
                ],
            )
            .await?;
        }
        Ok(())
    }
}

/// A snapshot of the fold every this many entries (and the newest two kept),
/// so that a new sequencer folds at most this many entries from Postgres.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 65_536;
/// Entries read from Postgres per query when folding from a snapshot.
const OPEN_BATCH_ENTRIES: i64 = 8_192;

/// The one sequencer's state: the fold of every entry in the ledger, and the
/// tree size it believes Postgres has.
#[derive(Debug)]
pub struct Sequencer {
    ledger: Ledger,
    tree_size: u64,
    ledger_partitions: u32,
    snapshot_every_entries: u64,
    poisoned: bool,
}

/// The newest snapshot at or below `head` whose digest checks, with its size.
async fn newest_snapshot(
    client: &tokio_postgres::Client,
    head: i64,
) -> Result<Option<(u64, Ledger)>, ProjectionError> {
    let rows = client
        .query(
            "select tree_size, fold, digest from sequencer_snapshots where tree_size <= $1 order by tree_size desc",
            &[&head],
        )
        .await?;
    for row in rows {
        let size: i64 = row.get(0);
        let (fold, digest): (&[u8], &[u8]) = (row.get(1), row.get(2));
        if blake3::hash(fold).as_bytes().as_slice() != digest {
            tracing::warn!(
                tree_size = size,
                "sequencer snapshot is damaged; trying an older one"
            );
            continue;
        }
        match serde_json::from_slice::<Ledger>(fold) {
            Ok(ledger) => return Ok(Some((u64::try_from(size).unwrap_or(0), ledger))),
            Err(e) => {
                tracing::warn!(tree_size = size, error = %e, "sequencer snapshot does not parse; trying an older one");
            }
        }
    }
    Ok(None)
}

impl Sequencer {
    /// Rebuilds the fold: the newest snapshot, then the entries after it in
    /// leaf order (all of them if there is no usable snapshot).
    pub async fn open(
        client: &tokio_postgres::Client,
        ledger_partitions: u32,
    ) -> Result<Self, ProjectionError> {
        let head: i64 = client
            .query_one("select tree_size from ledger_head", &[])
            .await?
            .get(0);
        let tree_size = u64::try_from(head).unwrap_or(0);
        let (mut next, mut ledger) = newest_snapshot(client, head)
            .await?
            .unwrap_or((0, Ledger::new()));
        while next < tree_size {
            let from = i64::try_from(next).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "select leaf_index, partition_id, event_offset, entry from ledger_entries
                     where leaf_index >= $1 and leaf_index < $2 order by leaf_index",
                    &[&from, &(from + OPEN_BATCH_ENTRIES).min(head)],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let index: i64 = row.get(0);
                let (partition, offset): (i32, i64) = (row.get(1), row.get(2));
                let entry_error = |why: String| ProjectionError::Entry {
                    partition,
                    offset,
                    why,
                };
                if index != i64::try_from(next).unwrap_or(i64::MAX) {
                    return Err(entry_error(format!("leaf {next} is missing")));
                }
                let event =
                    decode_entry(row.get::<_, &[u8]>(3)).map_err(|e| entry_error(e.to_string()))?;
                ledger.apply(&event).map_err(ProjectionError::Refused)?;
                next += 1;
            }
        }
        if next != tree_size {
            return Err(ProjectionError::Entry {
                partition: -1,
                offset: -1,
                why: format!("ledger_head says {tree_size} entries, the table has {next}"),
            });
        }
        Ok(Self {
            ledger,
            tree_size,
            ledger_partitions,
            snapshot_every_entries: SNAPSHOT_EVERY_ENTRIES,
            poisoned: false,
        })
    }

    /// Snapshots every `entries` entries instead of [`SNAPSHOT_EVERY_ENTRIES`].
    pub fn snapshot_every(mut self, entries: u64) -> Self {
        assert!(entries > 0, "a snapshot interval is at least one entry");
        self.snapshot_every_entries = entries;
        self
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn tree_size(&self) -> u64 {
        self.tree_size
    }

    /// Sequences `batch` (in the order read) and projects it, in one
    /// transaction with how far each partition was read (`read_to`: the next
    /// record number per partition; records that are not ledger entries count
    /// there without being in the batch). A handful of statements per batch,
    /// whatever its size: rows go in as arrays. The leader writes its decision
    /// to `order_log` before the commit; `replay`, which follows decisions
    /// already there, passes none.
    pub async fn apply(
        &mut self,
        client: &mut tokio_postgres::Client,
        topic: &str,
        order_log: Option<&dyn crate::eventlog::EventLog>,
        batch: Checked,
        read_to: &BTreeMap<i32, i64>,
    ) -> Result<Applied, ProjectionError> {
        if self.poisoned {
            return Err(ProjectionError::Poisoned);
        }
        let tx = client.transaction().await?;
        let found: i64 = tx
            .query_one("select tree_size from ledger_head for update", &[])
            .await?
            .get(0);
        let found = u64::try_from(found).unwrap_or(0);
        if found != self.tree_size {
            return Err(ProjectionError::Fenced {
                expected: self.tree_size,
                found,
            });
        }
        // A redelivered record is one already in the ledger: its (partition,
        // offset) is unique there, which is what its event id names.
        let (parts, offsets): (Vec<i32>, Vec<i64>) = batch
            .items
            .iter()
            .map(|(s, _)| (s.partition, s.offset))
            .unzip();
        let seen: BTreeSet<(i32, i64)> = tx
            .query(
                "select partition_id, event_offset from ledger_entries
                 join unnest($1::int[], $2::bigint[]) as t(p, o)
                 on partition_id = p and event_offset = o",
                &[&parts, &offsets],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // From here the fold moves ahead of Postgres until the commit.
        self.poisoned = true;
        let mut accounts = BTreeSet::new();
        let mut holds = BTreeSet::new();
        let mut rows = Rows::default();
        let mut skipped = 0u64;
        let mut in_batch = BTreeSet::new();
        let mut kept = Vec::with_capacity(batch.items.len());
        for (s, event) in &batch.items {
            let id = (s.partition, s.offset);
            let keep = !seen.contains(&id) && in_batch.insert(id);
            kept.push(keep);
            if !keep {
                skipped += 1;
                continue;
            }
            let (changed, hold) = touched(event, &self.ledger);
            self.ledger.apply(event).map_err(ProjectionError::Refused)?;
            accounts.extend(changed);
            holds.extend(hold);
            let index = i64::try_from(self.tree_size + rows.leaf.len() as u64).unwrap_or(i64::MAX);
            rows.entry(index, s);
            if let Event::HoldSettled {
                receipt,
                charged_micro,
                worker_earned_micro,
                fee_micro,
                ..
            } = event
            {
                let r = &receipt.receipt;
                let [charged, earned, fee] = [charged_micro, worker_earned_micro, fee_micro]
                    .map(|c| i64::try_from(c.get()).unwrap_or(i64::MAX));
                rows.receipt_job.push(r.job.to_string());
                rows.receipt_leaf.push(index);
                rows.receipt_consumer.push(r.consumer.to_string());
                rows.receipt_worker.push(r.worker.to_string());
                rows.receipt_amounts.push([charged, earned, fee]);
            }
            if let Event::PriceSchedulePublished { .. } | Event::KeyRotated { .. } = event {
                rows.network_leaf.push(index);
            }
            if let Event::WorkerRegistered {
                worker,
                key,
                account,
                ..
            } = event
            {
                rows.registered_worker.push(worker.to_string());
                rows.registered_key.push(&key.0);
                rows.registered_account.push(account.to_string());
            }
        }
        let sequenced = rows.leaf.len() as u64;
        rows.write(&tx).await?;
        crate::cluster::directory::project(&tx, &batch.directory).await?;
        self.write_accounts(&tx, &accounts).await?;
        self.write_holds(&tx, &holds).await?;
        let (parts, nexts): (Vec<i32>, Vec<i64>) = read_to.iter().map(|(p, n)| (*p, *n)).unzip();
        tx.execute(
            "insert into consumer_offsets (consumer_group, topic, partition_id, next_offset)
             select $1, $2, p, n from unnest($3::int[], $4::bigint[]) as t(p, n)
             on conflict (consumer_group, topic, partition_id) do update
             set next_offset = greatest(consumer_offsets.next_offset, excluded.next_offset)",
            &[&SEQUENCER_GROUP, &topic, &parts, &nexts],
        )
        .await?;
        let new_size = self.tree_size + sequenced;
        if new_size / self.snapshot_every_entries > self.tree_size / self.snapshot_every_entries {
            self.write_snapshot(&tx, new_size).await?;
        }
        let moved = tx
            .execute(
                "update ledger_head set tree_size = $1 where tree_size = $2",
                &[
                    &i64::try_from(new_size).unwrap_or(i64::MAX),
                    &i64::try_from(self.tree_size).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        if moved != 1 {
            return Err(ProjectionError::Fenced {
                expected: self.tree_size,
                found: u64::MAX,
            });
        }
        // The decision goes to the order log (Kafka, the source of truth)
        // before Postgres commits it: every committed leaf is in the log. The
        // row lock on ledger_head, and the log's own fencing of an older
        // writer, keep a second sequencer out of both.
        if let (Some(order_log), true) = (order_log, sequenced > 0) {
            let numbers = rows.offset.iter().map(|o| u64::try_from(*o).unwrap_or(0));
            let record =
                OrderRecord::new(self.tree_size, rows.partition.iter().copied().zip(numbers));
            order_log.submit(vec![record.encode()])?.durable().await?;
        }
        tx.commit().await?;
        self.tree_size = new_size;
        self.poisoned = false;
        drop(rows);
        let entries: Vec<Vec<u8>> = batch
            .items
            .into_iter()
            .zip(kept)
            .filter_map(|((s, _), keep)| keep.then_some(s.entry))
            .collect();
        assert_eq!(entries.len() as u64, sequenced, "one entry per new leaf");
        Ok(Applied {
            sequenced,
            skipped,
            tree_size: new_size,
            entries,
        })
    }

    async fn write_accounts(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        accounts: &BTreeSet<AccountId>,
    ) -> Result<(), ProjectionError> {
        let mut ids = Vec::new();
        let mut roles: Vec<Option<String>> = Vec::new();
        let mut partitions = Vec::new();
        let mut amounts: [Vec<String>; 3] = Default::default();
        for id in accounts {
            let Some(a) = self.ledger.account(id) else {
                continue;
            };
            ids.push(id.to_string());
            roles.push(a.role.map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            }));
            partitions.push(i32::try_from(partition_of(id, self.ledger_partitions)).unwrap_or(0));
            for (column, v) in
                amounts
                    .iter_mut()
                    .zip([a.debits_posted, a.credits_posted, a.debits_pending])
            {
                column.push(numeric(v));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let [debits_posted, credits_posted, debits_pending] = &amounts;
        tx.execute(
            "insert into accounts (account, role, ledger_partition, debits_posted, credits_posted, debits_pending)
             select a, r, p, dp::numeric, cp::numeric, dq::numeric
             from unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[]) as t(a, r, p, dp, cp, dq)
             on conflict (account) do update set role = excluded.role,
               debits_posted = excluded.debits_posted, credits_posted = excluded.credits_posted,
               debits_pending = excluded.debits_pending",
            &[&ids, &roles, &partitions, debits_posted, credits_posted, debits_pending],
        )
        .await?;
        Ok(())
    }

    async fn write_holds(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        holds: &BTreeSet<HoldId>,
    ) -> Result<(), ProjectionError> {
        let mut open = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut amounts = (Vec::new(), Vec::new(), Vec::new());
        let mut origins: Vec<Option<&str>> = Vec::new();
        let mut closed = Vec::new();
        for id in holds {
            match self.ledger.hold(id) {
                Some(h) => {
                    open.0.push(id.to_string());
                    open.1.push(h.account.to_string());
                    open.2.push(h.job.to_string());
                    open.3.push(h.model.clone());
                    amounts
                        .0
                        .push(i64::try_from(h.amount.get()).unwrap_or(i64::MAX));
                    amounts
                        .1
                        .push(i64::try_from(h.expires_at_ms).unwrap_or(i64::MAX));
                    amounts
                        .2
                        .push(i64::try_from(h.schedule_version).unwrap_or(i64::MAX));
                    origins.push(h.origin.as_deref());
                }
                None => closed.push(id.to_string()),
            }
        }
        if !open.0.is_empty() {
            tx.execute(
                "insert into holds (hold, account, job, model, amount_micro, expires_at_ms, schedule_version, origin_node)
                 select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[])
                 on conflict (hold) do nothing",
                &[&open.0, &open.1, &open.2, &open.3, &amounts.0, &amounts.1, &amounts.2, &origins],
            )
            .await?;
        }
        if !closed.is_empty() {
            tx.execute("delete from holds where hold = any($1)", &[&closed])
                .await?;
        }
        Ok(())
    }

    /// The fold at `tree_size`, in the batch's transaction; the newest two kept.
    async fn write_snapshot(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        tree_size: u64,
    ) -> Result<(), ProjectionError> {
        assert_eq!(
            self.ledger.applied(),
            tree_size,
            "the fold has applied every sequenced entry"
        );
        let fold = serde_json::to_vec(&self.ledger).expect("the fold serializes");
        let digest = blake3::hash(&fold);
        let size = i64::try_from(tree_size).unwrap_or(i64::MAX);
        tx.execute(
            "insert into sequencer_snapshots (tree_size, fold, digest) values ($1, $2, $3)
             on conflict (tree_size) do nothing",
            &[&size, &fold, &digest.as_bytes().as_slice()],
        )
        .await?;
        tx.execute(
            "delete from sequencer_snapshots where tree_size not in
             (select tree_size from sequencer_snapshots order by tree_size desc limit 2)",
            &[],
        )
        .await?;
        Ok(())
    }

    /// Where the sequencer goes on reading each partition of `topic`.
    pub async fn positions(
        client: &tokio_postgres::Client,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>, ProjectionError> {
        Ok(client
            .query(
                "select partition_id, next_offset from consumer_offsets where consumer_group = $1 and topic = $2",
                &[&SEQUENCER_GROUP, &topic],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use troop_schemas::event::{AccountRole, ModelPrice, VoidReason};
    use troop_schemas::{CreditsMicro, JobId};

    use super::*;

    fn micro(n: u64) -> CreditsMicro {
        CreditsMicro::new(n).expect("small")
    }

    #[test]
    fn touched_covers_every_account_and_hold_an_event_changes() {
        let a = AccountId::derive(b"a");
        let b = AccountId::derive(b"b");
        let hold = |n: u8, amount| Event::HoldPlaced {
            hold: HoldId([n; 16]),
            job: JobId([n; 16]),
            account: a,
            model: "m".into(),
            amount_micro: micro(amount),
            expires_at_ms: 10,
            schedule_version: 1,
            at_ms: 1,
            origin: None,
        };
        let events = [
            Event::PriceSchedulePublished {
                version: 1,
                fee_bps: 0,
                prices: vec![ModelPrice {
                    model: "m".into(),
                    input_micro_per_1k: micro(1),
                    output_micro_per_1k: micro(1),
                }],
                at_ms: 1,
            },
            Event::AccountOpened {
                account: a,
                role: AccountRole::Consumer,
                at_ms: 1,
            },
            Event::AccountOpened {
                account: b,
                role: AccountRole::Worker,
                at_ms: 1,
            },
            Event::Grant {
                account: a,
                amount_micro: micro(1_000),
                memo: String::new(),
                at_ms: 1,
            },
            hold(1, 100),
            hold(2, 200),
            Event::HoldVoided {
                hold: HoldId([1; 16]),
                reason: VoidReason::Failed,
                at_ms: 2,
            },
            Event::HoldExpired {
                hold: HoldId([2; 16]),
                at_ms: 11,
            },
            Event::Transfer {
                from: a,
                to: b,
                amount_micro: micro(300),
                memo: String::new(),
                at_ms: 12,
            },
        ];
        let mut ledger = Ledger::new();
        for event in &events {
            let before: BTreeMap<AccountId, _> =
                ledger.accounts().map(|(id, a)| (*id, a.clone())).collect();
            let holds_before: BTreeSet<HoldId> = ledger.open_holds().map(|(h, _)| *h).collect();
            let (accounts, hold) = touched(event, &ledger);
            ledger.apply(event).expect("valid");
            for (id, after) in ledger.accounts() {
                if before.get(id) != Some(after) {
                    assert!(accounts.contains(id), "{event:?} changed {id}");
                }
            }
            let holds_after: BTreeSet<HoldId> = ledger.open_holds().map(|(h, _)| *h).collect();
            for changed in holds_before.symmetric_difference(&holds_after) {
                assert_eq!(hold, Some(*changed), "{event:?}");
            }
        }
    }

    /// A settlement entry with a real worker-signed, countersigned receipt;
    /// `tamper` changes the receipt after signing.
    fn settlement(n: u8, tamper: impl FnOnce(&mut troop_schemas::CountersignedReceipt)) -> Vec<u8> {
        use ed25519_dalek::SigningKey;
        use troop_ledger::receipt::{countersign, public_key, sign_receipt};
        let (worker, coordinator) = (
            SigningKey::from_bytes(&[7; 32]),
            SigningKey::from_bytes(&[9; 32]),
        );
        let worker_key = public_key(&worker);
        let body = troop_schemas::Receipt {
            job: JobId::derive(&[n]),
            hold: HoldId::derive(&[n]),
            consumer: AccountId::derive(b"c"),
            worker: troop_schemas::WorkerId::from_key(&worker_key),
            worker_key,
            model: "m".into(),
            input_tokens: 3,
            output_tokens: 5,
            request_digest: troop_schemas::Digest::of(b"req"),
            response_digest: troop_schemas::Digest::of(b"resp"),
            started_at_ms: 1,
            finished_at_ms: 2,
        };
        let sig = sign_receipt(&worker, &body).expect("signs");
        let mut receipt = countersign(&coordinator, body, sig, 3, 5).expect("countersigns");
        tamper(&mut receipt);
        troop_schemas::encode_entry(&Event::HoldSettled {
            hold: HoldId::derive(&[n]),
            receipt,
            charged_micro: micro(8),
            worker_earned_micro: micro(7),
            fee_micro: micro(1),
            at_ms: 3,
        })
        .expect("encodes")
    }

    fn sourced(offset: i64, entry: Vec<u8>) -> Sourced {
        Sourced {
            partition: 2,
            offset,
            entry,
        }
    }

    #[test]
    fn a_batch_is_sequenced_only_if_every_receipt_signature_verifies() {
        let grant = troop_schemas::encode_entry(&Event::Grant {
            account: AccountId::derive(b"c"),
            amount_micro: micro(10),
            memo: String::new(),
            at_ms: 1,
        })
        .expect("encodes");
        let good: Vec<Sourced> = (0..4)
            .map(|i| sourced(i64::from(i), settlement(i, |_| {})))
            .chain([sourced(4, grant)])
            .collect();
        assert_eq!(Checked::check(good.clone()).expect("all sound").len(), 5);

        // More output billed than the coordinator signed for: its signature fails.
        let mut billed_more = good.clone();
        billed_more[2] = sourced(2, settlement(2, |r| r.billed_output_tokens += 1));
        // A worker's count changed after it signed: the worker's signature fails
        // (and the countersignature, which covers it).
        let mut worker_lied = good.clone();
        worker_lied[1] = sourced(1, settlement(1, |r| r.receipt.output_tokens += 1));
        for (batch, offset, who) in [(billed_more, 2, "coordinator"), (worker_lied, 1, "worker")] {
            match Checked::check(batch) {
                Err(ProjectionError::Receipt {
                    partition: 2,
                    offset: o,
                    source: ReceiptError::BadSignature { who: w },
                }) => assert_eq!((o, w), (offset, who)),
                other => panic!("expected a bad {who} signature at {offset}, got {other:?}"),
            }
        }
        let mut garbage = good;
        garbage[3].entry = b"{not an entry".to_vec();
        assert!(matches!(
            Checked::check(garbage),
            Err(ProjectionError::Entry { offset: 3, .. })
        ));
    }

    #[test]
    fn accounts_spread_over_partitions_and_stay_put() {
        let mut seen = BTreeSet::new();
        for n in 0..200u32 {
            let account = AccountId::derive(&n.to_be_bytes());
            let p = partition_of(&account, 12);
            assert!(p < 12);
            assert_eq!(p, partition_of(&account, 12), "deterministic");
            seen.insert(p);
        }
        assert_eq!(seen.len(), 12, "200 accounts reach every partition");
    }
}
