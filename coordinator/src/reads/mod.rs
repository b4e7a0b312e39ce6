//! The port through which the API reads the books: an account with its open
//! holds, registered workers, receipts with their inclusion proofs, the
//! published ledger. On one node the embedded books answer
//! ([`crate::embedded::Embedded`], exact as of the last change); on a
//! cluster node Postgres does ([`crate::cluster::reads::PgReads`], as of the
//! sequencer's last batch, usually a fraction of a second behind the owners).
//! Both pass one suite, [`conformance`].
//!
//! Changes never go through here: they go through [`crate::money::Money`],
//! whose verdicts are the only answers a caller may act on.

pub mod conformance;

use futures_util::future::BoxFuture;
use troop_ledger::fold::{Account, Hold, Ledger, Schedule, Worker};
use troop_ledger::note::Checkpoint;
use troop_ledger::proof::TlogProof;
use troop_ledger::tile::{self, TileHashReader, TileId, TileSource};
use troop_schemas::{AccountId, HoldId, JobId, PublicKey, WorkerId};

/// An account and its open holds (sorted by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub account: Account,
    pub holds: Vec<(HoldId, Hold)>,
}

/// A receipt as logged, with the proof that it is in the signed ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedReceipt {
    pub index: u64,
    /// The `hold_settled` entry, canonical JSON.
    pub entry: Vec<u8>,
    /// `c2sp.org/tlog-proof@v1` text.
    pub tlog_proof: String,
}

/// The most accounts one listing returns: the admin API pages past it.
pub const MAX_LIST_ACCOUNTS: usize = 10_000;

/// How far the ledger is behind what was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// Entries in the ledger (the embedded books' own; a node reads the
    /// sequencer's projection).
    pub entries: u64,
    /// Entries not yet covered by a signed checkpoint.
    pub ledger_entries: u64,
    /// Judged records not yet durable in the event log, where this node
    /// knows (the embedded books do; a cluster node's sequencer reports its
    /// own lag on its `/metrics`).
    pub log_records: Option<u64>,
}

/// The network's own facts in force, as the ledger says: the price schedule
/// and the keys that sign checkpoints and countersign receipts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    pub schedule: Option<Schedule>,
    pub log_key: Option<(String, PublicKey)>,
    pub coordinator_key: Option<PublicKey>,
}

impl Network {
    pub fn of(ledger: &Ledger) -> Self {
        Self {
            schedule: ledger.schedule().cloned(),
            log_key: ledger.log_key().cloned(),
            coordinator_key: ledger.coordinator_key().copied(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The books or the database cannot answer now; asking again may work.
    #[error("the books are unavailable: {0}")]
    Unavailable(String),
    /// What is stored contradicts itself (a missing tile, a bad entry).
    #[error("the books are inconsistent: {0}")]
    Corrupt(String),
}

pub type Read<T> = BoxFuture<'static, Result<T, ReadError>>;

/// Reads of the books. Every answer is a state the books were in; a cluster
/// node's may be older than a change whose verdict the caller already holds.
pub trait Reads: Send + Sync + std::fmt::Debug + 'static {
    fn account(&self, account: AccountId) -> Read<Option<AccountView>>;
    /// Up to `limit` (at most [`MAX_LIST_ACCOUNTS`]) accounts in id order,
    /// starting after `after`.
    fn accounts(&self, after: Option<AccountId>, limit: usize) -> Read<Vec<(AccountId, Account)>>;
    fn worker(&self, worker: WorkerId) -> Read<Option<Worker>>;
    /// A settled job's receipt, once it is in a signed checkpoint.
    fn receipt(&self, job: JobId) -> Read<Option<LoggedReceipt>>;
    /// One file of `/ledger/` (the checkpoint or a tile path already checked
    /// with [`troop_ledger::store::check_path`]).
    fn ledger_file(&self, path: String) -> Read<Option<Vec<u8>>>;
    fn lag(&self) -> Read<Lag>;
    fn network(&self) -> Read<Network>;
}

/// Entry `index` of the tree that the signed `note` (stating `checkpoint`)
/// commits to, with its inclusion proof, read from `source`; the one proof
/// builder of both adapters.
pub fn prove<S: TileSource + ?Sized>(
    source: &S,
    note: &str,
    checkpoint: &Checkpoint,
    index: u64,
) -> Result<LoggedReceipt, String> {
    let id = TileId::for_size(None, index / 256, checkpoint.size)
        .ok_or_else(|| format!("entry {index} is beyond the tree of {}", checkpoint.size))?;
    let bundle = source
        .read(&id.path())?
        .ok_or_else(|| format!("{} missing", id.path()))?;
    let entries = tile::decode_bundle(&bundle, usize::from(id.width)).map_err(|e| e.to_string())?;
    let entry = entries[usize::try_from(index % 256).expect("< 256")].to_vec();
    let reader = TileHashReader::new(source, checkpoint.size);
    let proof = TlogProof::build(&reader, note, checkpoint, index).map_err(|e| e.to_string())?;
    Ok(LoggedReceipt {
        index,
        entry,
        tlog_proof: proof.to_text(),
    })
}
