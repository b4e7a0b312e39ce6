//! The port through which balance changes reach the books. On one node the
//! embedded books judge them ([`crate::embedded::Embedded`]); on a
//! cluster node the owner of the change's ledger partition does, in this
//! process or over the internal API ([`crate::cluster::internal::ClusterBooks`]).
//! Both pass one suite, [`conformance`].
//!
//! A verdict is acknowledged only once [`Judged::durable`] says the accepted
//! events are recorded: before that a crash could lose them.

pub mod conformance;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use troop_ledger::fold::FoldError;
use troop_schemas::event::AccountRole;
use troop_schemas::{AccountId, Event, PublicKey, WorkerId};

use crate::directory::Directory;
use crate::eventlog::Pending;

/// Whose change it is. In a cluster this picks the judge: every event whose
/// checks could conflict goes to the same one (CLUSTER.md, "Which partition
/// judges an event").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// Opens or moves the account's money: its holds and their outcomes,
    /// grants to it, transfers out of it.
    Account(AccountId),
    /// Registers or rewards the worker.
    Worker(WorkerId),
    /// The network's own facts: price schedules and keys.
    Network,
}

/// How much was missing, for the 402 a refused hold becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    pub available_micro: i128,
    pub needed_micro: u64,
}

/// Why the books refused one event: a word a caller can act on
/// ([`Refusal::INSUFFICIENT_FUNDS`], …), the books' own message, and for a
/// shortfall the numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortfall: Option<Shortfall>,
}

impl Refusal {
    pub const INSUFFICIENT_FUNDS: &'static str = "insufficient_funds";
    pub const UNKNOWN_MODEL: &'static str = "unknown_model";
    pub const UNKNOWN_ACCOUNT: &'static str = "unknown_account";
    /// A settlement names a worker its judge does not know (yet, in a
    /// cluster: registered in another partition and not followed).
    pub const UNKNOWN_WORKER: &'static str = "unknown_worker";
    pub const HOLD_NOT_OPEN: &'static str = "hold_not_open";
    /// The account, worker or hold is there already: opening or registering
    /// it again is done; a hold placed again was placed by an earlier try.
    pub const ALREADY_EXISTS: &'static str = "already_exists";
    /// Any other rule of the fold.
    pub const REFUSED: &'static str = "refused";

    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            shortfall: None,
        }
    }

    /// The fold's refusal, with its code.
    pub fn of(e: &FoldError) -> Self {
        let code = match e {
            FoldError::InsufficientFunds { .. } => Self::INSUFFICIENT_FUNDS,
            FoldError::UnknownModel(_)
            | FoldError::NoPriceSchedule
            | FoldError::UnknownScheduleVersion(_) => Self::UNKNOWN_MODEL,
            FoldError::UnknownAccount(_) => Self::UNKNOWN_ACCOUNT,
            FoldError::UnknownWorker(_) => Self::UNKNOWN_WORKER,
            FoldError::HoldNotOpen(_) => Self::HOLD_NOT_OPEN,
            FoldError::DuplicateAccount(_)
            | FoldError::DuplicateWorker(_)
            | FoldError::DuplicateHold(_) => Self::ALREADY_EXISTS,
            _ => Self::REFUSED,
        };
        let shortfall = match e {
            FoldError::InsufficientFunds {
                available, needed, ..
            } => Some(Shortfall {
                available_micro: *available,
                needed_micro: *needed,
            }),
            _ => None,
        };
        Self {
            shortfall,
            ..Self::new(code, e.to_string())
        }
    }
}

/// One event's verdict: its record number in the event log, or why not.
pub type Verdict = Result<u64, Refusal>;

/// The verdicts on a change, and the write that makes the accepted ones
/// durable (none when nothing was accepted, or it already is).
#[derive(Debug)]
pub struct Judged {
    pub verdicts: Vec<Verdict>,
    pub pending: Option<Pending>,
}

impl Judged {
    /// The verdicts, once they may be acknowledged.
    pub async fn durable(self) -> Result<Vec<Verdict>, MoneyError> {
        if let Some(pending) = self.pending {
            pending
                .durable()
                .await
                .map_err(|e| MoneyError::Unknown(e.to_string()))?;
        }
        Ok(self.verdicts)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MoneyError {
    /// Nothing of the change was judged; it may be sent again.
    #[error("the books cannot judge now: {0}")]
    Unavailable(String),
    /// Accepted, but whether it was recorded is unknown: never acknowledged,
    /// never sent again (a restart, or the partition's next owner, resolves it
    /// from the log).
    #[error("the outcome is unknown: {0}")]
    Unknown(String),
    /// The one event of a single-event commit was refused.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The books, as request handlers and actors see them.
pub trait Money: Send + Sync + std::fmt::Debug {
    /// Judges `events` in order and starts recording the accepted ones. The
    /// change is handed over before this returns, so changes sent one after
    /// another by one caller are judged in that order by the embedded books;
    /// in a cluster only a change sent after an earlier one's verdict is sure
    /// to come after it (a settlement after its hold always does).
    fn change(
        &self,
        home: Home,
        events: Vec<Event>,
    ) -> BoxFuture<'static, Result<Judged, MoneyError>>;

    /// Appends `records` (keys, bans: nothing a fold judges) to `home`'s log
    /// and returns once they are durable; the one writer of the home's log
    /// writes them, in order with its ledger entries.
    fn append(
        &self,
        home: Home,
        records: Vec<Directory>,
    ) -> BoxFuture<'static, Result<(), MoneyError>>;
}

/// Commits one event and returns its record number once it is durable.
pub async fn commit_one(money: &dyn Money, home: Home, event: Event) -> Result<u64, MoneyError> {
    let verdicts = money.change(home, vec![event]).await?.durable().await?;
    let verdict = verdicts.into_iter().next().expect("one verdict per event");
    Ok(verdict?)
}

/// How long a change waits for what it names (an account, a worker) to
/// reach its judge (in a cluster, the owner of another partition follows it
/// once sequenced: a fraction of a second when idle).
pub const REGISTRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `attempt`, asked again every 50 ms while its judge refuses it with `code`
/// (something judged in another partition has not reached it yet), up to
/// [`REGISTRATION_WAIT`]. A refusal wrote nothing, so asking again is safe.
pub async fn until_known<T, F>(code: &str, mut attempt: impl FnMut() -> F) -> Result<T, MoneyError>
where
    F: std::future::Future<Output = Result<T, MoneyError>>,
{
    let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
    loop {
        match attempt().await {
            Err(MoneyError::Refused(r))
                if r.code == code && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Opens the earnings account of the worker with `key` and registers the
/// worker, each unless it is done already; returns the worker's id once both
/// are durable. In a cluster the two are judged by different owners (the
/// account's partition and the worker's), so the registration is asked again
/// while its judge does not know the account yet, up to [`REGISTRATION_WAIT`].
pub async fn register_worker(
    money: &dyn Money,
    key: PublicKey,
    at_ms: u64,
) -> Result<WorkerId, MoneyError> {
    let worker = WorkerId::from_key(&key);
    let account = AccountId::derive(&key.0);
    let done =
        |r: &MoneyError| matches!(r, MoneyError::Refused(r) if r.code == Refusal::ALREADY_EXISTS);
    let opened = Event::AccountOpened {
        account,
        role: AccountRole::Worker,
        at_ms,
    };
    match commit_one(money, Home::Account(account), opened).await {
        Err(e) if !done(&e) => return Err(e),
        _ => {}
    }
    let registered = Event::WorkerRegistered {
        worker,
        key,
        account,
        at_ms,
    };
    match until_known(Refusal::UNKNOWN_ACCOUNT, || {
        commit_one(money, Home::Worker(worker), registered.clone())
    })
    .await
    {
        Err(e) if !done(&e) => Err(e),
        _ => Ok(worker),
    }
}
