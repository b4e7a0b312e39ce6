//! The `ProjectionStore` port (CLUSTER.md, "Ports"): where the sequencer's
//! projection lives. The sequencer decides (leaf indexes, the fold, which
//! events are redeliveries, what each account and hold now holds); a store
//! only keeps what it is told, atomically per batch, fenced by the tree size
//! it was told to extend, and reads it back.
//!
//! Two adapters pass one suite ([`conformance`], `projection_store_conformance!`):
//! [`MemProjection`] (in memory; the sequencer's logic tested without IO)
//! and [`PgProjection`] (the cluster's Postgres tables every node reads).

pub mod conformance;
mod memory;
mod postgres;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use troop_ledger::fold::{Account, Hold, Worker};
use troop_schemas::{AccountId, HoldId, JobId, WorkerId};

use crate::cluster::directory::KeyRow;
use crate::cluster::projection::{ProjectionError, Sourced};
use crate::directory::Directory;

pub use memory::MemProjection;
pub use postgres::{PgProjection, positions};

/// An account as the fold has it, and its ledger partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub account: AccountId,
    pub partition: u32,
    pub state: Account,
}

/// A settled job: where its receipt is in the ledger and what it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRow {
    pub job: JobId,
    pub leaf: u64,
    pub consumer: AccountId,
    pub worker: WorkerId,
    pub charged_micro: u64,
    pub worker_earned_micro: u64,
    pub fee_micro: u64,
}

/// One batch's effect, decided by the sequencer: stored all or nothing.
#[derive(Debug, Default)]
pub struct Commit {
    /// The tree size the batch extends: a store holding any other size was
    /// moved by another sequencer, and refuses ([`ProjectionError::Fenced`]).
    pub tree_size: u64,
    /// The new leaves, `tree_size ..` in order.
    pub leaves: Vec<Sourced>,
    pub receipts: Vec<ReceiptRow>,
    /// Leaves that publish prices or keys (every node reads them whole).
    pub network_leaves: Vec<u64>,
    /// Workers registered by the batch, with their key and account.
    pub registrations: Vec<(WorkerId, Worker)>,
    /// API keys and bans read with the batch.
    pub directory: Vec<Directory>,
    /// Accounts the batch changed, as they are now.
    pub accounts: Vec<AccountRow>,
    /// Holds the batch opened (a hold once stored does not change).
    pub holds_opened: Vec<(HoldId, Hold)>,
    /// Holds the batch settled, voided or expired.
    pub holds_closed: Vec<HoldId>,
    /// How far each ledger partition was read: the next record number.
    /// Positions only move forward.
    pub read_to: BTreeMap<i32, i64>,
    /// The fold after the batch, serialized, when it is due a snapshot. A
    /// store keeps the newest two.
    pub snapshot: Option<Vec<u8>>,
}

impl Commit {
    /// The tree size once the batch is stored.
    pub fn new_tree_size(&self) -> u64 {
        self.tree_size + self.leaves.len() as u64
    }
}

/// Where the sequencer's projection is kept. Every method may be called
/// concurrently by several holders of the same store (two sequencers, one of
/// them stale): the tree size fences all but one.
pub trait ProjectionStore: Send + Sync {
    /// Leaves sequenced so far.
    fn tree_size(&self) -> impl Future<Output = Result<u64, ProjectionError>> + Send;

    /// Where the sequencer goes on reading each ledger partition.
    fn positions(&self)
    -> impl Future<Output = Result<BTreeMap<i32, i64>, ProjectionError>> + Send;

    /// The stored snapshots at or below `tree_size` whose digest checks,
    /// newest first, with the tree size each is the fold at.
    fn snapshots(
        &self,
        tree_size: u64,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, ProjectionError>> + Send;

    /// Leaves `from .. to` (fewer if the ledger ends first), in order, each
    /// with its index.
    fn leaves(
        &self,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<(u64, Sourced)>, ProjectionError>> + Send;

    /// Which of `ids` (partition, record number) are already leaves.
    fn sequenced_among(
        &self,
        ids: &[(i32, i64)],
    ) -> impl Future<Output = Result<BTreeSet<(i32, i64)>, ProjectionError>> + Send;

    /// Stores `commit` atomically if the store still holds
    /// `commit.tree_size` leaves, awaiting `before` once the batch is
    /// written and fenced and before it becomes visible: an error from it
    /// stores nothing. (The sequencer writes its decision to the order log
    /// there, so every stored leaf is in the log.)
    fn commit<F>(
        &self,
        commit: &Commit,
        before: F,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send
    where
        F: Future<Output = Result<(), ProjectionError>> + Send;

    fn account(
        &self,
        account: &AccountId,
    ) -> impl Future<Output = Result<Option<AccountRow>, ProjectionError>> + Send;

    fn hold(
        &self,
        hold: &HoldId,
    ) -> impl Future<Output = Result<Option<Hold>, ProjectionError>> + Send;

    fn receipt(
        &self,
        job: &JobId,
    ) -> impl Future<Output = Result<Option<ReceiptRow>, ProjectionError>> + Send;

    fn registration(
        &self,
        worker: &WorkerId,
    ) -> impl Future<Output = Result<Option<Worker>, ProjectionError>> + Send;

    /// Leaves that publish prices or keys, ascending.
    fn network_leaves(&self) -> impl Future<Output = Result<Vec<u64>, ProjectionError>> + Send;

    /// Every API key (with whether it is revoked) and every banned worker,
    /// each in key order.
    fn directory(
        &self,
    ) -> impl Future<Output = Result<(Vec<KeyRow>, Vec<WorkerId>), ProjectionError>> + Send;
}
