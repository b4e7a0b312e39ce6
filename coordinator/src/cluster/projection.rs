//! The sequencer's projection (CLUSTER.md, "The ledger: one sequencer,
//! fenced"): batches of judged ledger events, read from the ledger
//! partitions, get their leaf indexes and are stored, with the balances and
//! holds they change, in one commit together with the consumer offsets they
//! came from (through the [`ProjectionStore`] port: Postgres in the cluster).
//!
//! The balances are computed by the same pure fold as everywhere else (an
//! in-memory [`Ledger`] that mirrors the tables); the store only keeps what
//! the fold says, for every node to read. A second sequencer is fenced by a
//! compare-and-swap on the tree size; a redelivered event (same id) is skipped.

use std::collections::{BTreeMap, BTreeSet};

use troop_ledger::fold::{FoldError, Ledger, Worker};
use troop_ledger::receipt::{self, KeyCache, ReceiptError};
use troop_schemas::{AccountId, Event, HoldId, decode_entry, decode_entry_spans};

use crate::cluster::projection_store::{AccountRow, Commit, ProjectionStore, ReceiptRow};
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
        client_id: &str,
    ) -> Result<Self, crate::eventlog::EventLogError> {
        Ok(Self {
            partitions,
            reader: crate::cluster::kafka_log::TopicReader::open(brokers, topic, client_id)?,
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
    #[error("the projection: {0}")]
    BadRow(#[from] crate::cluster::rows::BadRow),
}

impl From<crate::cluster::rows::RowError> for ProjectionError {
    fn from(e: crate::cluster::rows::RowError) -> Self {
        match e {
            crate::cluster::rows::RowError::Postgres(e) => e.into(),
            crate::cluster::rows::RowError::Bad(e) => e.into(),
        }
    }
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

/// A snapshot of the fold every this many entries (and the newest two kept),
/// so that a new sequencer folds at most this many entries from its store.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 65_536;
/// Entries read from the store per read when folding from a snapshot.
const OPEN_BATCH_ENTRIES: u64 = 8_192;

/// The one sequencer's state: the fold of every entry in the ledger, and the
/// tree size it believes its store has.
#[derive(Debug)]
pub struct Sequencer {
    ledger: Ledger,
    tree_size: u64,
    ledger_partitions: u32,
    snapshot_every_entries: u64,
    poisoned: bool,
}

/// The newest stored snapshot that parses, with its size.
async fn newest_snapshot(
    store: &impl ProjectionStore,
    head: u64,
) -> Result<Option<(u64, Ledger)>, ProjectionError> {
    for (size, fold) in store.snapshots(head).await? {
        match serde_json::from_slice::<Ledger>(&fold) {
            Ok(ledger) => return Ok(Some((size, ledger))),
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
        store: &impl ProjectionStore,
        ledger_partitions: u32,
    ) -> Result<Self, ProjectionError> {
        let tree_size = store.tree_size().await?;
        let (mut next, mut ledger) = newest_snapshot(store, tree_size)
            .await?
            .unwrap_or((0, Ledger::new()));
        while next < tree_size {
            let leaves = store
                .leaves(next, (next + OPEN_BATCH_ENTRIES).min(tree_size))
                .await?;
            if leaves.is_empty() {
                break;
            }
            for (index, s) in &leaves {
                let entry_error = |why: String| ProjectionError::Entry {
                    partition: s.partition,
                    offset: s.offset,
                    why,
                };
                if *index != next {
                    return Err(entry_error(format!("leaf {next} is missing")));
                }
                let event = decode_entry(&s.entry).map_err(|e| entry_error(e.to_string()))?;
                ledger.apply(&event).map_err(ProjectionError::Refused)?;
                next += 1;
            }
        }
        if next != tree_size {
            return Err(ProjectionError::Entry {
                partition: -1,
                offset: -1,
                why: format!("the store says {tree_size} entries, it holds {next}"),
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

    /// Sequences `batch` (in the order read) and stores its effect, in one
    /// commit with how far each partition was read (`read_to`: the next
    /// record number per partition; records that are not ledger entries count
    /// there without being in the batch). The leader writes its decision to
    /// `order_log` before the commit; `replay`, which follows decisions
    /// already there, passes none.
    pub async fn apply(
        &mut self,
        store: &impl ProjectionStore,
        order_log: Option<&dyn crate::eventlog::EventLog>,
        batch: Checked,
        read_to: &BTreeMap<i32, i64>,
    ) -> Result<Applied, ProjectionError> {
        if self.poisoned {
            return Err(ProjectionError::Poisoned);
        }
        // A redelivered record is one already in the ledger: its (partition,
        // offset) is unique there, which is what its event id names. Asked
        // before the commit: only this sequencer adds leaves while the tree
        // size is the one it extends, which the commit checks.
        let ids: Vec<(i32, i64)> = batch
            .items
            .iter()
            .map(|(s, _)| (s.partition, s.offset))
            .collect();
        let seen = store.sequenced_among(&ids).await?;
        // From here the fold moves ahead of the store until the commit.
        self.poisoned = true;
        let mut accounts = BTreeSet::new();
        let mut holds = BTreeSet::new();
        let mut commit = Commit {
            tree_size: self.tree_size,
            directory: batch.directory,
            read_to: read_to.clone(),
            ..Commit::default()
        };
        let mut skipped = 0u64;
        let mut in_batch = BTreeSet::new();
        for (s, event) in batch.items {
            let id = (s.partition, s.offset);
            if seen.contains(&id) || !in_batch.insert(id) {
                skipped += 1;
                continue;
            }
            let (changed, hold) = touched(&event, &self.ledger);
            self.ledger
                .apply(&event)
                .map_err(ProjectionError::Refused)?;
            accounts.extend(changed);
            holds.extend(hold);
            let index = commit.new_tree_size();
            match &event {
                Event::HoldSettled {
                    receipt,
                    charged_micro,
                    worker_earned_micro,
                    fee_micro,
                    ..
                } => {
                    let r = &receipt.receipt;
                    commit.receipts.push(ReceiptRow {
                        job: r.job,
                        leaf: index,
                        consumer: r.consumer,
                        worker: r.worker,
                        charged_micro: charged_micro.get(),
                        worker_earned_micro: worker_earned_micro.get(),
                        fee_micro: fee_micro.get(),
                    });
                }
                Event::PriceSchedulePublished { .. } | Event::KeyRotated { .. } => {
                    commit.network_leaves.push(index);
                }
                Event::WorkerRegistered {
                    worker,
                    key,
                    account,
                    ..
                } => commit.registrations.push((
                    *worker,
                    Worker {
                        key: *key,
                        account: *account,
                    },
                )),
                _ => {}
            }
            commit.leaves.push(s);
        }
        let sequenced = commit.leaves.len() as u64;
        let new_size = commit.new_tree_size();
        for id in &accounts {
            if let Some(a) = self.ledger.account(id) {
                commit.accounts.push(AccountRow {
                    account: *id,
                    partition: partition_of(id, self.ledger_partitions),
                    state: a.clone(),
                });
            }
        }
        for id in &holds {
            match self.ledger.hold(id) {
                Some(h) => commit.holds_opened.push((*id, h.clone())),
                None => commit.holds_closed.push(*id),
            }
        }
        if new_size / self.snapshot_every_entries > self.tree_size / self.snapshot_every_entries {
            assert_eq!(
                self.ledger.applied(),
                new_size,
                "the fold has applied every sequenced entry"
            );
            commit.snapshot = Some(serde_json::to_vec(&self.ledger).expect("the fold serializes"));
        }
        // The decision goes to the order log (Kafka, the source of truth)
        // before the store commits it: every committed leaf is in the log.
        // The store's fence on the tree size, and the log's own fencing of an
        // older writer, keep a second sequencer out of both.
        let decided = async {
            if let (Some(order_log), true) = (order_log, sequenced > 0) {
                let numbers = commit
                    .leaves
                    .iter()
                    .map(|s| (s.partition, u64::try_from(s.offset).unwrap_or(0)));
                let record = OrderRecord::new(self.tree_size, numbers);
                order_log.submit(vec![record.encode()])?.durable().await?;
            }
            Ok(())
        };
        store.commit(&commit, decided).await?;
        self.tree_size = new_size;
        self.poisoned = false;
        let entries: Vec<Vec<u8>> = commit.leaves.into_iter().map(|s| s.entry).collect();
        assert_eq!(entries.len() as u64, sequenced, "one entry per new leaf");
        Ok(Applied {
            sequenced,
            skipped,
            tree_size: new_size,
            entries,
        })
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
