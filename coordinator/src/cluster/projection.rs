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
use troop_schemas::{AccountId, Event, HoldId, decode_entry};

/// The consumer group whose offsets the sequencer keeps in Postgres.
pub const SEQUENCER_GROUP: &str = "troop-sequencer";

/// The ledger partition an account's events go to. Computed here, never left
/// to a client's partitioner (librdkafka's and Java's differ).
pub fn partition_of(account: &AccountId, partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has partitions");
    let digest = blake3::hash(account.to_string().as_bytes());
    let head = u64::from_be_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"));
    u32::try_from(head % u64::from(partitions)).expect("below a u32")
}

/// The id of the record numbered `seq` in `partition` of `topic`: a partition
/// has one writer at a time (fenced) and numbers its records without gaps, so
/// a redelivered record has the same number, hence the same id.
pub fn event_id(topic: &str, partition: i32, seq: u64) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(b"troop-event-id/v1\n");
    h.update(topic.as_bytes());
    h.update(&partition.to_be_bytes());
    h.update(&seq.to_be_bytes());
    h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
}

/// Reads every ledger partition from where the sequencer stopped.
#[derive(Debug)]
pub struct LedgerFeed {
    topic: String,
    readers: Vec<crate::cluster::kafka_log::PartitionReader>,
}

impl LedgerFeed {
    pub fn open(
        brokers: &str,
        topic: &str,
        partitions: u32,
    ) -> Result<Self, crate::eventlog::EventLogError> {
        let readers = (0..partitions)
            .map(|p| {
                crate::cluster::kafka_log::PartitionReader::open(
                    brokers,
                    topic,
                    i32::try_from(p).unwrap_or(i32::MAX),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            topic: topic.to_owned(),
            readers,
        })
    }

    /// Up to `max_per_partition` committed records of each partition after
    /// `positions` (next record numbers; absent means from the start):
    /// the ledger entries among them, and how far each partition was read.
    /// Blocks on the broker: call it off the async runtime.
    pub fn poll(
        &mut self,
        positions: &BTreeMap<i32, i64>,
        max_per_partition: usize,
    ) -> Result<(Vec<Sourced>, BTreeMap<i32, i64>), crate::eventlog::EventLogError> {
        let mut batch = Vec::new();
        let mut read_to = BTreeMap::new();
        for (p, reader) in self.readers.iter_mut().enumerate() {
            let partition = i32::try_from(p).unwrap_or(i32::MAX);
            let from = positions.get(&partition).copied().unwrap_or(0);
            let from = u64::try_from(from).unwrap_or(0);
            let records = reader.read(from, max_per_partition, None)?;
            let Some(last) = records.last() else { continue };
            read_to.insert(
                partition,
                i64::try_from(last.offset + 1).unwrap_or(i64::MAX),
            );
            for r in records {
                // Ledger entries only; keys and other records just move the position.
                if r.payload.first() != Some(&crate::books::TAG_LEDGER_ENTRY) {
                    continue;
                }
                batch.push(Sourced {
                    event_id: event_id(&self.topic, partition, r.offset),
                    partition,
                    offset: i64::try_from(r.offset).unwrap_or(i64::MAX),
                    entry: r.payload[1..].to_vec(),
                });
            }
        }
        Ok((batch, read_to))
    }
}

/// One judged event as the sequencer read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced {
    /// Unique per event: a redelivered record has the same id.
    pub event_id: [u8; 16],
    pub partition: i32,
    pub offset: i64,
    /// The canonical ledger entry.
    pub entry: Vec<u8>,
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
    #[error("the fold refused an event its owner accepted ({0}); stopping")]
    Refused(FoldError),
    #[error("a batch failed after the fold moved: reopen from postgres")]
    Poisoned,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub sequenced: u64,
    /// Redeliveries of events already in the ledger.
    pub skipped: u64,
    pub tree_size: u64,
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
    event_id: Vec<&'a [u8]>,
    receipt_job: Vec<String>,
    receipt_leaf: Vec<i64>,
    receipt_consumer: Vec<String>,
    receipt_worker: Vec<String>,
    /// Charged, worker earned, fee.
    receipt_amounts: Vec<[i64; 3]>,
}

impl<'a> Rows<'a> {
    fn entry(&mut self, index: i64, s: &'a Sourced) {
        self.leaf.push(index);
        self.partition.push(s.partition);
        self.offset.push(s.offset);
        self.entry.push(&s.entry);
        self.event_id.push(&s.event_id);
    }

    async fn write(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        topic: &str,
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
        tx.execute(
            "insert into applied_events (event_id, topic, partition_id, event_offset)
             select id, $1, p, o from unnest($2::bytea[], $3::int[], $4::bigint[]) as t(id, p, o)",
            &[&topic, &self.event_id, &self.partition, &self.offset],
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
    /// whatever its size: rows go in as arrays.
    pub async fn apply(
        &mut self,
        client: &mut tokio_postgres::Client,
        topic: &str,
        batch: &[Sourced],
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
        let ids: Vec<&[u8]> = batch.iter().map(|s| s.event_id.as_slice()).collect();
        let seen: BTreeSet<Vec<u8>> = tx
            .query(
                "select event_id from applied_events where event_id = any($1)",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .collect();

        // From here the fold moves ahead of Postgres until the commit.
        self.poisoned = true;
        let mut accounts = BTreeSet::new();
        let mut holds = BTreeSet::new();
        let mut rows = Rows::default();
        let mut skipped = 0u64;
        let mut in_batch = BTreeSet::new();
        for s in batch {
            if seen.contains(s.event_id.as_slice()) || !in_batch.insert(s.event_id) {
                skipped += 1;
                continue;
            }
            let event = decode_entry(&s.entry).map_err(|e| ProjectionError::Entry {
                partition: s.partition,
                offset: s.offset,
                why: e.to_string(),
            })?;
            let (changed, hold) = touched(&event, &self.ledger);
            self.ledger
                .apply(&event)
                .map_err(ProjectionError::Refused)?;
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
            } = &event
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
        }
        let sequenced = rows.leaf.len() as u64;
        rows.write(&tx, topic).await?;
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
        tx.commit().await?;
        self.tree_size = new_size;
        self.poisoned = false;
        Ok(Applied {
            sequenced,
            skipped,
            tree_size: new_size,
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
        let mut amounts = (Vec::new(), Vec::new());
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
                }
                None => closed.push(id.to_string()),
            }
        }
        if !open.0.is_empty() {
            tx.execute(
                "insert into holds (hold, account, job, model, amount_micro, expires_at_ms)
                 select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])
                 on conflict (hold) do nothing",
                &[&open.0, &open.1, &open.2, &open.3, &amounts.0, &amounts.1],
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
            at_ms: 1,
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
