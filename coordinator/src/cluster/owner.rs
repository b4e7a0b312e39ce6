//! The owner of a ledger partition (CLUSTER.md, "Who judges an account's
//! money"): the one node that judges the balance changes of the accounts in
//! its partition and writes them there through the partition's fenced log.
//!
//! What the owner judges against: the ledger as sequenced (the sequencer's
//! fold, loaded from Postgres at some tree size), this partition's records
//! that are not sequenced yet (its own, and on takeover the previous owner's
//! tail), and every later sequenced entry of the other partitions
//! ([`PartitionBooks::follow`]). Why that is safe: an account is debited only
//! by events in its own partition, and this fold holds all of them, in order;
//! credits from other partitions count only once sequenced. So when the
//! sequencer applies an event this owner accepted, everything the owner
//! relied on is already in the ledger before it (it was sequenced before the
//! event existed), and the account has at least the balance the owner saw.
//!
//! Opening the partition's log fences the previous owner before its tail is
//! read, so nothing the old owner writes can land after the new owner's load.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use troop_ledger::fold::{FoldError, Hold, Ledger};
use troop_schemas::{AccountId, EntryError, Event, decode_entry};

use crate::books::{TAG_LEDGER_ENTRY, judge, ledger_record};
use crate::cluster::blocking;
use crate::cluster::kafka_log::{KafkaLog, KafkaLogConfig};
use crate::cluster::projection::{ProjectionError, Sequencer, partition_of, partition_of_key};
use crate::cluster::projection_store::{PgProjection, ProjectionStore as _};
use crate::config::ClusterConfig;
use crate::directory::Directory;
use crate::eventlog::{EventLog, EventLogError, Pending};
use crate::money::Home;

/// Records read per step from the partition's tail on load.
const LOAD_BATCH_RECORDS: usize = 4_096;
/// Sequenced entries read per query by [`PartitionBooks::follow`].
pub const FOLLOW_BATCH_ENTRIES: usize = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Refused(#[from] FoldError),
    #[error("event cannot be encoded: {0}")]
    Encoding(#[from] EntryError),
    #[error("partition {home} judges this event, not partition {here}")]
    NotHere { home: u32, here: i32 },
    #[error("no partition owner can judge a {0}: it depends on every partition at once")]
    Unjudgeable(&'static str),
    #[error("event log: {0}")]
    EventLog(#[from] EventLogError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("partition {partition} record {offset}: {why}")]
    Entry {
        partition: i32,
        offset: u64,
        why: String,
    },
    #[error(
        "the sequenced ledger disagrees with this owner's fold ({0}): load the partition again"
    )]
    Diverged(String),
    #[error("a write failed after the fold moved: load the partition again")]
    Poisoned,
    #[error(
        "partition {partition}'s log ends at record {log_end}, but records up to {applied} were \
         read before: the broker lost records it had acknowledged; restore its data before this \
         partition is judged again"
    )]
    LogLost {
        partition: i32,
        log_end: u64,
        applied: u64,
    },
    #[error("this node does not own partition {0} (or has not loaded it yet)")]
    NotOwned(i32),
    #[error("a blocking task failed: {0}")]
    Blocking(String),
}

/// The partition whose owner judges `event`: the one holding every event its
/// checks could conflict with. An account's money moves out only through its
/// own partition (holds and their outcomes, transfers out); a worker's
/// registration and rewards go by the worker, so that two accounts cannot
/// both register it; the network's own events (prices, keys) go to the
/// treasury's partition, so that their versions have one judge. `None`: the
/// fold cannot place it (an unknown hold) and will refuse it.
pub fn home_partition(
    event: &Event,
    ledger: &Ledger,
    partitions: u32,
) -> Result<Option<u32>, OwnerError> {
    let account = |a: &AccountId| Some(Home::Account(*a));
    let home = match event {
        Event::AccountOpened { account: a, .. }
        | Event::Grant { account: a, .. }
        | Event::HoldPlaced { account: a, .. }
        | Event::Transfer { from: a, .. } => account(a),
        Event::HoldSettled { hold, .. }
        | Event::HoldVoided { hold, .. }
        | Event::HoldExpired { hold, .. } => ledger.hold(hold).and_then(|h| account(&h.account)),
        Event::WorkerRegistered { worker, .. } | Event::UptimeReward { worker, .. } => {
            Some(Home::Worker(*worker))
        }
        Event::PriceSchedulePublished { .. } | Event::KeyRotated { .. } => Some(Home::Network),
        // Its check compares totals over every account, which no owner holds.
        Event::BalanceSnapshot { .. } => return Err(OwnerError::Unjudgeable("balance snapshot")),
    };
    Ok(home.map(|h| partition_of_home(h, partitions)))
}

/// The partition that judges the changes of `home`.
pub fn partition_of_home(home: Home, partitions: u32) -> u32 {
    match home {
        Home::Account(a) => partition_of(&a, partitions),
        Home::Worker(w) => partition_of_key(&w.to_string(), partitions),
        Home::Network => partition_of(&AccountId::TREASURY, partitions),
    }
}

/// A ledger entry as the sequencer stored it.
#[derive(Debug, Clone)]
pub struct SequencedEntry {
    pub leaf: u64,
    pub partition: i32,
    pub offset: u64,
    pub entry: Vec<u8>,
}

/// Up to [`FOLLOW_BATCH_ENTRIES`] sequenced entries from leaf `from` on, in order.
pub async fn sequenced_since(
    client: &tokio_postgres::Client,
    from: u64,
) -> Result<Vec<SequencedEntry>, OwnerError> {
    let from = i64::try_from(from).unwrap_or(i64::MAX);
    let limit = i64::try_from(FOLLOW_BATCH_ENTRIES).unwrap_or(i64::MAX);
    Ok(client
        .query(
            "select leaf_index, partition_id, event_offset, entry from ledger_entries
             where leaf_index >= $1 order by leaf_index limit $2",
            &[&from, &limit],
        )
        .await?
        .iter()
        .map(|row| SequencedEntry {
            leaf: u64::try_from(row.get::<_, i64>(0)).unwrap_or(u64::MAX),
            partition: row.get(1),
            offset: u64::try_from(row.get::<_, i64>(2)).unwrap_or(u64::MAX),
            entry: row.get(3),
        })
        .collect())
}

/// One verdict per event (its record number in the partition, or why it was
/// refused), and the durability to wait for before acknowledging.
pub type Submitted = (Vec<Result<u64, OwnerError>>, Option<Pending>);

/// One owned partition: its fenced log and the fold its owner judges against.
pub struct PartitionBooks {
    partition: i32,
    partitions: u32,
    log: Arc<dyn EventLog>,
    ledger: Ledger,
    /// Per partition, the next record number the fold reflects.
    applied_to: BTreeMap<i32, u64>,
    /// Sequenced entries the fold reflects: the next leaf [`Self::follow`] reads.
    tree_size: u64,
    poisoned: bool,
}

impl std::fmt::Debug for PartitionBooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionBooks")
            .field("partition", &self.partition)
            .field("tree_size", &self.tree_size)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl From<crate::cluster::BlockingFailed> for OwnerError {
    fn from(e: crate::cluster::BlockingFailed) -> Self {
        Self::Blocking(e.0)
    }
}

impl PartitionBooks {
    /// Takes `partition` over: opens its log as the one writer (fencing the
    /// previous owner), then loads its fold.
    pub async fn take(
        client: &tokio_postgres::Client,
        cluster: &ClusterConfig,
        partition: i32,
    ) -> Result<Self, OwnerError> {
        let config = KafkaLogConfig::ledger_owner(cluster, partition);
        let log = blocking(move || KafkaLog::open(config)).await??;
        Self::load(
            client,
            Arc::new(log),
            &cluster.topic("ledger"),
            partition,
            cluster.ledger_partitions,
        )
        .await
    }

    /// The fold of `partition` written through `log` (already its one
    /// writer): the sequenced ledger and the sequencer's positions, read in
    /// one snapshot of Postgres, then this partition's records past its
    /// position, read from the log. `client` runs a transaction meanwhile:
    /// nothing else may use it until this returns.
    pub async fn load(
        client: &tokio_postgres::Client,
        log: Arc<dyn EventLog>,
        topic: &str,
        partition: i32,
        partitions: u32,
    ) -> Result<Self, OwnerError> {
        assert!(
            u32::try_from(partition).is_ok_and(|p| p < partitions),
            "partition {partition} of {partitions}"
        );
        // The fold at tree size N and the positions it was read to are
        // committed together; one snapshot sees both as of the same batch.
        client
            .batch_execute("begin transaction isolation level repeatable read read only")
            .await?;
        let read = async {
            let store = PgProjection::new(client, topic);
            let sequencer = Sequencer::open(&store, partitions).await?;
            let positions = store.positions().await?;
            Ok::<_, ProjectionError>((sequencer, positions))
        }
        .await;
        client
            .batch_execute(if read.is_ok() { "commit" } else { "rollback" })
            .await?;
        let (sequencer, positions) = read?;
        let mut books = Self {
            partition,
            partitions,
            log,
            tree_size: sequencer.tree_size(),
            ledger: sequencer.ledger().clone(),
            applied_to: positions
                .into_iter()
                .map(|(p, next)| (p, u64::try_from(next).unwrap_or(0)))
                .collect(),
            poisoned: false,
        };
        // The tail: records of this partition the sequencer has not read.
        loop {
            let (log, from) = (Arc::clone(&books.log), books.next(partition));
            let batch = blocking(move || log.read(from, LOAD_BATCH_RECORDS)).await??;
            if batch.is_empty() {
                break;
            }
            for record in batch {
                books.fold_record(partition, record.offset, &record.payload, false)?;
            }
        }
        // A log shorter than what was read from it (a broker that lost
        // acknowledged records in a crash): judging on would number new
        // records over ones the ledger already has.
        let (log_end, applied) = (books.log.next_offset(), books.next(partition));
        if log_end < applied {
            return Err(OwnerError::LogLost {
                partition,
                log_end,
                applied,
            });
        }
        Ok(books)
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Sequenced entries folded.
    pub fn tree_size(&self) -> u64 {
        self.tree_size
    }

    /// The next record of `partition` the fold would take.
    fn next(&self, partition: i32) -> u64 {
        self.applied_to.get(&partition).copied().unwrap_or(0)
    }

    /// Folds record `offset` of `partition` (a ledger entry or any other
    /// record, which only moves the position). `sequenced`: it comes from the
    /// ledger, where it has already been judged, so a refusal means this fold
    /// and the ledger disagree.
    fn fold_record(
        &mut self,
        partition: i32,
        offset: u64,
        payload: &[u8],
        sequenced: bool,
    ) -> Result<(), OwnerError> {
        let next = self.next(partition);
        let entry_error = |why: String| OwnerError::Entry {
            partition,
            offset,
            why,
        };
        if offset < next {
            return Err(entry_error(format!("already folded (next is {next})")));
        }
        if let Some((&TAG_LEDGER_ENTRY, entry)) = payload.split_first() {
            let event = decode_entry(entry).map_err(|e| entry_error(e.to_string()))?;
            self.ledger.apply(&event).map_err(|e| {
                if sequenced {
                    OwnerError::Diverged(format!("partition {partition} record {offset}: {e}"))
                } else {
                    entry_error(format!(
                        "the partition holds an entry its fold refuses: {e}"
                    ))
                }
            })?;
        }
        self.applied_to.insert(partition, offset + 1);
        Ok(())
    }

    /// Folds sequenced entry `leaf` (record `offset` of `partition`). This
    /// partition's entries are already in the fold (it wrote or loaded them);
    /// another partition's are new to it.
    pub fn fold_sequenced(
        &mut self,
        leaf: u64,
        partition: i32,
        offset: u64,
        entry: &[u8],
    ) -> Result<(), OwnerError> {
        if leaf != self.tree_size {
            return Err(OwnerError::Diverged(format!(
                "leaf {leaf} follows {} folded",
                self.tree_size
            )));
        }
        if partition == self.partition {
            // Only this owner (and, before it, the owners whose tail it
            // loaded) wrote here: a record it does not know had another writer.
            if offset >= self.next(partition) {
                return Err(OwnerError::Diverged(format!(
                    "record {offset} of this partition was written by another owner"
                )));
            }
        } else {
            self.fold_record(partition, offset, &ledger_record(entry), true)?;
        }
        self.tree_size += 1;
        Ok(())
    }

    /// Folds what the sequencer added to the ledger since the last call;
    /// returns how many entries. Call it often enough that other partitions'
    /// credits, accounts and workers reach this owner's judgement soon.
    pub async fn follow(&mut self, client: &tokio_postgres::Client) -> Result<u64, OwnerError> {
        let start = self.tree_size;
        loop {
            let rows = sequenced_since(client, self.tree_size).await?;
            self.fold_all(&rows)?;
            if rows.len() < FOLLOW_BATCH_ENTRIES {
                return Ok(self.tree_size - start);
            }
        }
    }

    /// Folds the entries of `rows` (consecutive, from [`sequenced_since`])
    /// that this fold has not reached yet.
    pub fn fold_all(&mut self, rows: &[SequencedEntry]) -> Result<(), OwnerError> {
        let from = self.tree_size;
        for e in rows.iter().filter(|e| e.leaf >= from) {
            self.fold_sequenced(e.leaf, e.partition, e.offset, &e.entry)?;
        }
        Ok(())
    }

    /// Whether `hold` is of this partition's own accounts (the fold also
    /// holds other partitions' holds, from the sequenced ledger: their owners
    /// close those).
    fn mine(&self, hold: &Hold) -> bool {
        i64::from(partition_of(&hold.account, self.partitions)) == i64::from(self.partition)
    }

    /// The node incarnations this partition's open holds are for.
    pub fn origins(&self) -> BTreeSet<String> {
        self.ledger
            .open_holds()
            .filter(|(_, h)| self.mine(h))
            .filter_map(|(_, h)| h.origin.clone())
            .collect()
    }

    /// Expires the overdue holds of this partition's own accounts, voids
    /// those whose node is in `dead_origins`, and queues both; returns how
    /// many. Nobody waits on them: the log commits them with its next group.
    pub fn expire_due(
        &mut self,
        now_ms: u64,
        dead_origins: &BTreeSet<String>,
    ) -> Result<usize, OwnerError> {
        let due =
            crate::books::due_expiries(&self.ledger, now_ms, dead_origins, |hold| self.mine(hold));
        if due.is_empty() {
            return Ok(0);
        }
        let (verdicts, _pending) = self.submit(&due)?;
        let mut expired = 0;
        for verdict in verdicts {
            verdict?;
            expired += 1;
        }
        Ok(expired)
    }

    /// Queues directory records (keys, bans) on the partition's log, after
    /// everything it judged before; nothing judges them, and the fold only
    /// moves past them. Wait for the pending before acknowledging.
    pub fn append(&mut self, records: &[Directory]) -> Result<Pending, OwnerError> {
        if self.poisoned {
            return Err(OwnerError::Poisoned);
        }
        self.write(records.iter().map(Directory::to_record).collect())
    }

    /// Queues `records` on the partition's log, numbered right after the
    /// last record the fold reflects.
    fn write(&mut self, records: Vec<Vec<u8>>) -> Result<Pending, OwnerError> {
        let here = self.partition;
        let count = records.len() as u64;
        let pending = self.log.submit(records)?;
        assert_eq!(
            pending.first,
            self.next(here),
            "the partition's one writer numbers its records without gaps"
        );
        self.applied_to.insert(here, pending.first + count);
        Ok(pending)
    }

    /// Judges `events` in order and queues the accepted ones on the
    /// partition's log; acknowledge them only once the pending resolves. An
    /// event another partition judges is refused ([`OwnerError::NotHere`]).
    pub fn submit(&mut self, events: &[Event]) -> Result<Submitted, OwnerError> {
        if self.poisoned {
            return Err(OwnerError::Poisoned);
        }
        let (here, partitions) = (self.partition, self.partitions);
        let (judged, entries) =
            judge(
                &mut self.ledger,
                events,
                |ledger, event| match home_partition(event, ledger, partitions)? {
                    Some(home) if i64::from(home) != i64::from(here) => {
                        Err(OwnerError::NotHere { home, here })
                    }
                    _ => Ok(()),
                },
            );
        if entries.is_empty() {
            return Ok((judged.into_iter().map(|v| v.map(|_| 0)).collect(), None));
        }
        let records = entries.iter().map(|e| ledger_record(e)).collect();
        // A failed write leaves the fold with events the log does not have:
        // it is ahead for good.
        let pending = self.write(records).inspect_err(|_| self.poisoned = true)?;
        let verdicts = judged
            .into_iter()
            .map(|v| v.map(|i| pending.first + i as u64))
            .collect();
        Ok((verdicts, Some(pending)))
    }
}

#[cfg(test)]
mod tests {
    use troop_schemas::event::{AccountRole, KeyRole, ModelPrice};
    use troop_schemas::{CreditsMicro, HoldId, JobId, WorkerId, encode_entry};

    use super::*;

    fn micro(n: u64) -> CreditsMicro {
        CreditsMicro::new(n).expect("small")
    }

    fn entry(event: &Event) -> Vec<u8> {
        encode_entry(event).expect("encodes")
    }

    /// An account of each partition of `partitions`, found by trying names.
    fn account_in(partition: u32, partitions: u32) -> AccountId {
        (0u32..)
            .map(|n| AccountId::derive(&n.to_be_bytes()))
            .find(|a| partition_of(a, partitions) == partition)
            .expect("some account lands there")
    }

    /// A fold over a file log in `dir`, as if loaded at tree size 0.
    fn books(dir: &tempfile::TempDir, partition: i32, partitions: u32) -> PartitionBooks {
        let log =
            crate::eventlog::file::FileLog::open(dir.path(), Default::default()).expect("opens");
        PartitionBooks {
            partition,
            partitions,
            log: Arc::new(log),
            ledger: Ledger::new(),
            applied_to: BTreeMap::new(),
            tree_size: 0,
            poisoned: false,
        }
    }

    #[test]
    fn every_event_has_one_judge_and_a_snapshot_has_none() {
        let partitions = 4;
        let (a, b) = (account_in(1, partitions), account_in(2, partitions));
        let mut ledger = Ledger::new();
        for e in [
            Event::AccountOpened {
                account: a,
                role: AccountRole::Consumer,
                at_ms: 1,
            },
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
            Event::Grant {
                account: a,
                amount_micro: micro(100),
                memo: String::new(),
                at_ms: 1,
            },
            Event::HoldPlaced {
                hold: HoldId([1; 16]),
                job: JobId([1; 16]),
                account: a,
                model: "m".into(),
                amount_micro: micro(10),
                expires_at_ms: 10,
                schedule_version: 1,
                at_ms: 1,
                origin: None,
            },
        ] {
            ledger.apply(&e).expect("valid");
        }
        let home = |e: &Event| home_partition(e, &ledger, partitions).expect("judgeable");
        // A hold's outcome is judged where the hold's account lives.
        let void = Event::HoldVoided {
            hold: HoldId([1; 16]),
            reason: troop_schemas::event::VoidReason::Failed,
            at_ms: 2,
        };
        assert_eq!(home(&void), Some(1));
        let unknown = Event::HoldExpired {
            hold: HoldId([9; 16]),
            at_ms: 2,
        };
        assert_eq!(home(&unknown), None, "the fold refuses it");
        // A transfer is judged by the account it debits.
        let transfer = Event::Transfer {
            from: b,
            to: a,
            amount_micro: micro(1),
            memo: String::new(),
            at_ms: 2,
        };
        assert_eq!(home(&transfer), Some(2));
        let key = Event::KeyRotated {
            role: KeyRole::Coordinator,
            name: "c".into(),
            key: troop_schemas::PublicKey([3; 32]),
            at_ms: 1,
        };
        assert_eq!(
            home(&key),
            Some(partition_of(&AccountId::TREASURY, partitions))
        );
        let worker = WorkerId::from_key(&troop_schemas::PublicKey([4; 32]));
        let register = Event::WorkerRegistered {
            worker,
            key: troop_schemas::PublicKey([4; 32]),
            account: a,
            at_ms: 1,
        };
        assert_eq!(
            home(&register),
            Some(partition_of_key(&worker.to_string(), partitions)),
            "by the worker, whichever account registers it"
        );
        let snapshot = ledger.snapshot(3);
        assert!(matches!(
            home_partition(&snapshot, &ledger, partitions),
            Err(OwnerError::Unjudgeable(_))
        ));
    }

    #[test]
    fn an_owner_refuses_another_partitions_events_and_numbers_its_own() {
        let partitions = 2;
        let (mine, theirs) = (account_in(0, partitions), account_in(1, partitions));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut owner = books(&dir, 0, partitions);
        let open = |account| Event::AccountOpened {
            account,
            role: AccountRole::Consumer,
            at_ms: 1,
        };
        let (verdicts, pending) = owner
            .submit(&[open(mine), open(theirs), open(mine)])
            .expect("submits");
        assert!(matches!(verdicts[0], Ok(0)));
        assert!(matches!(
            verdicts[1],
            Err(OwnerError::NotHere { home: 1, here: 0 })
        ));
        assert!(matches!(
            verdicts[2],
            Err(OwnerError::Refused(FoldError::DuplicateAccount(_)))
        ));
        assert_eq!(pending.expect("one accepted").count, 1);
        assert!(owner.ledger().account(&theirs).is_none());
        let (verdicts, _) = owner
            .submit(&[Event::Grant {
                account: mine,
                amount_micro: micro(5),
                memo: String::new(),
                at_ms: 2,
            }])
            .expect("submits");
        assert!(matches!(verdicts[0], Ok(1)), "record numbers go on");
    }

    #[test]
    fn sequenced_entries_of_other_partitions_are_folded_once_and_this_ones_never_twice() {
        let partitions = 2;
        let (mine, theirs) = (account_in(0, partitions), account_in(1, partitions));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut owner = books(&dir, 0, partitions);
        let opened_mine = Event::AccountOpened {
            account: mine,
            role: AccountRole::Consumer,
            at_ms: 1,
        };
        owner
            .submit(std::slice::from_ref(&opened_mine))
            .expect("submits");
        let opened_theirs = Event::AccountOpened {
            account: theirs,
            role: AccountRole::Worker,
            at_ms: 1,
        };
        // The ledger's order: theirs (partition 1, record 0), then mine.
        owner
            .fold_sequenced(0, 1, 0, &entry(&opened_theirs))
            .expect("new to this fold");
        assert!(owner.ledger().account(&theirs).is_some());
        owner
            .fold_sequenced(1, 0, 0, &entry(&opened_mine))
            .expect("already folded: skipped");
        assert_eq!(owner.tree_size(), 2);
        assert_eq!(owner.ledger().applied(), 2, "each entry folded once");
        // A leaf out of order, a record this owner never wrote, and a
        // redelivered record of another partition are each a divergence.
        assert!(matches!(
            owner.fold_sequenced(5, 1, 1, &entry(&opened_theirs)),
            Err(OwnerError::Diverged(_))
        ));
        assert!(matches!(
            owner.fold_sequenced(2, 0, 7, &entry(&opened_mine)),
            Err(OwnerError::Diverged(_))
        ));
        assert!(matches!(
            owner.fold_sequenced(2, 1, 0, &entry(&opened_theirs)),
            Err(OwnerError::Entry { offset: 0, .. })
        ));
        // An entry of another partition this fold refuses: the fold and the
        // ledger disagree.
        assert!(matches!(
            owner.fold_sequenced(2, 1, 1, &entry(&opened_theirs)),
            Err(OwnerError::Diverged(_))
        ));
    }
}
