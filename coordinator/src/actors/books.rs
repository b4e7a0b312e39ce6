//! The books as an actor: one thread, one writer, group-committed batches.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use actix::prelude::*;
use troop_ledger::fold::{Account, Hold, Schedule, Worker};
use troop_ledger::tile::TileSource as _;
use troop_schemas::{AccountId, Event, HoldId, JobId, WorkerId};

use crate::books::{Books, BooksError, Submitted};
use crate::directory::Directory;
use crate::eventlog::EventLog;
use crate::money::{Home, Judged, Money, MoneyError, Refusal};
use crate::reads::{
    AccountView, Lag, LoggedReceipt, MAX_LIST_ACCOUNTS, Network, Read, ReadError, Reads,
};

#[derive(Debug)]
pub struct BooksActor {
    pub books: Books,
    pub schedule: PublishedSchedule,
}

/// The price schedule in force, as the books last judged it: read on every
/// request without a round trip to the books' thread. Requests priced a moment
/// before a change are what they would be had they come a moment earlier.
#[derive(Debug, Clone, Default)]
pub struct PublishedSchedule(Arc<RwLock<Option<Arc<Schedule>>>>);

impl PublishedSchedule {
    pub fn get(&self) -> Option<Arc<Schedule>> {
        self.0.read().expect("schedule lock").clone()
    }

    /// Takes the books' schedule if its version moved.
    pub fn refresh(&self, books: &Books) {
        self.set(books.ledger().schedule());
    }

    /// Takes `current` if its version is not the one held.
    pub fn set(&self, current: Option<&Schedule>) {
        let held = self.get().map(|s| s.version);
        if current.map(|s| s.version) != held {
            *self.0.write().expect("schedule lock") = current.cloned().map(Arc::new);
        }
    }
}

impl Actor for BooksActor {
    type Context = SyncContext<Self>;
}

/// Judges events in order and queues the accepted ones on the event log as
/// one batch; the sender acknowledges once the [`crate::eventlog::Pending`] resolves.
#[derive(Debug, Message)]
#[rtype(result = "Result<Submitted, BooksError>")]
pub struct Commit(pub Vec<Event>);

impl Handler<Commit> for BooksActor {
    type Result = Result<Submitted, BooksError>;
    fn handle(&mut self, msg: Commit, _: &mut Self::Context) -> Self::Result {
        let submitted = self.books.submit(&msg.0);
        if msg
            .0
            .iter()
            .any(|e| matches!(e, Event::PriceSchedulePublished { .. }))
        {
            self.schedule.refresh(&self.books);
        }
        submitted
    }
}

/// The embedded books behind the [`Money`] and [`Reads`] ports: one judge
/// for every account, read on the books' own thread (exact as of the last
/// change), and the ledger published in `ledger_dir`.
#[derive(Clone)]
pub struct Embedded {
    pub books: Addr<BooksActor>,
    /// The books' event log: directory records go there directly (no fold
    /// judges them), sharing its group commits.
    pub events: Arc<dyn EventLog>,
    pub ledger_dir: PathBuf,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("ledger_dir", &self.ledger_dir)
            .finish_non_exhaustive()
    }
}

impl Money for Embedded {
    fn change(
        &self,
        _: Home,
        events: Vec<Event>,
    ) -> futures_util::future::BoxFuture<'static, Result<Judged, MoneyError>> {
        // Queued on the books' mailbox here, in the caller's order.
        let request = self.books.send(Commit(events));
        Box::pin(async move {
            let (verdicts, pending) = request
                .await
                .map_err(|_| MoneyError::Unavailable("the books stopped".into()))?
                .map_err(|e| MoneyError::Unavailable(e.to_string()))?;
            let verdicts = verdicts
                .into_iter()
                .map(|v| {
                    v.map_err(|e| match &e {
                        BooksError::Refused(f) => Refusal::of(f),
                        other => Refusal::new(Refusal::REFUSED, other.to_string()),
                    })
                })
                .collect();
            Ok(Judged { verdicts, pending })
        })
    }

    fn append(
        &self,
        _: Home,
        records: Vec<Directory>,
    ) -> futures_util::future::BoxFuture<'static, Result<(), MoneyError>> {
        let submitted = self
            .events
            .submit(records.iter().map(Directory::to_record).collect());
        Box::pin(async move {
            submitted
                .map_err(|e| MoneyError::Unavailable(e.to_string()))?
                .durable()
                .await
                .map_err(|e| MoneyError::Unknown(e.to_string()))?;
            Ok(())
        })
    }
}

/// Expires holds past their deadline; returns how many.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, BooksError>")]
pub struct ExpireHolds {
    pub now_ms: u64,
}

impl Handler<ExpireHolds> for BooksActor {
    type Result = Result<usize, BooksError>;
    fn handle(&mut self, msg: ExpireHolds, _: &mut Self::Context) -> Self::Result {
        self.books.expire_holds(msg.now_ms)
    }
}

/// Signs a new checkpoint if anything changed. Sent every second by a timer.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, troop_ledger::Hash), BooksError>")]
pub struct Publish;

impl Handler<Publish> for BooksActor {
    type Result = Result<(u64, troop_ledger::Hash), BooksError>;
    fn handle(&mut self, _: Publish, _: &mut Self::Context) -> Self::Result {
        self.books.publish()
    }
}

#[derive(Debug, Message)]
#[rtype(result = "Option<AccountView>")]
pub struct GetAccount(pub AccountId);

impl Handler<GetAccount> for BooksActor {
    type Result = Option<AccountView>;
    fn handle(&mut self, msg: GetAccount, _: &mut Self::Context) -> Self::Result {
        let ledger = self.books.ledger();
        let account = ledger.account(&msg.0)?.clone();
        let mut holds: Vec<(HoldId, Hold)> = ledger
            .open_holds()
            .filter(|(_, h)| h.account == msg.0)
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        holds.sort_by_key(|(id, _)| *id);
        Some(AccountView { account, holds })
    }
}

/// The key the ledger says countersigns receipts, and whether a worker is registered.
#[derive(Debug, Message)]
#[rtype(result = "Option<Worker>")]
pub struct GetWorker(pub troop_schemas::WorkerId);

impl Handler<GetWorker> for BooksActor {
    type Result = Option<Worker>;
    fn handle(&mut self, msg: GetWorker, _: &mut Self::Context) -> Self::Result {
        self.books.ledger().worker(&msg.0).cloned()
    }
}

/// The network's prices and keys in force.
#[derive(Debug, Message)]
#[rtype(result = "Network")]
pub struct GetNetwork;

impl Handler<GetNetwork> for BooksActor {
    type Result = MessageResult<GetNetwork>;
    fn handle(&mut self, _: GetNetwork, _: &mut Self::Context) -> Self::Result {
        MessageResult(Network::of(self.books.ledger()))
    }
}

/// A settled job's receipt with its inclusion proof.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<LoggedReceipt>, BooksError>")]
pub struct GetReceipt(pub troop_schemas::JobId);

impl Handler<GetReceipt> for BooksActor {
    type Result = Result<Option<LoggedReceipt>, BooksError>;
    fn handle(&mut self, msg: GetReceipt, _: &mut Self::Context) -> Self::Result {
        self.books.receipt(&msg.0)
    }
}

#[derive(Debug, Message)]
#[rtype(result = "(u64, u64, u64)")]
pub struct GetLag;

/// (ledger entries, those not yet in a signed checkpoint, ledger records not
/// yet durable).
impl Handler<GetLag> for BooksActor {
    type Result = MessageResult<GetLag>;
    fn handle(&mut self, _: GetLag, _: &mut Self::Context) -> Self::Result {
        MessageResult((
            self.books.entries(),
            self.books.lag(),
            self.books.undurable(),
        ))
    }
}

/// Up to `limit` accounts in id order after `after`.
#[derive(Debug, Message)]
#[rtype(result = "Vec<(AccountId, Account)>")]
pub struct ListAccounts {
    pub after: Option<AccountId>,
    pub limit: usize,
}

impl Handler<ListAccounts> for BooksActor {
    type Result = Vec<(AccountId, Account)>;
    fn handle(&mut self, msg: ListAccounts, _: &mut Self::Context) -> Self::Result {
        let mut page: Vec<_> = self
            .books
            .ledger()
            .accounts()
            .filter(|(id, _)| msg.after.is_none_or(|after| **id > after))
            .map(|(id, a)| (*id, a.clone()))
            .collect();
        page.sort_by_key(|(id, _)| *id);
        page.truncate(msg.limit.min(MAX_LIST_ACCOUNTS));
        page
    }
}

fn stopped(_: MailboxError) -> ReadError {
    ReadError::Unavailable("the books stopped".into())
}

impl Reads for Embedded {
    fn account(&self, account: AccountId) -> Read<Option<AccountView>> {
        let asked = self.books.send(GetAccount(account));
        Box::pin(async move { asked.await.map_err(stopped) })
    }

    fn accounts(&self, after: Option<AccountId>, limit: usize) -> Read<Vec<(AccountId, Account)>> {
        let asked = self.books.send(ListAccounts { after, limit });
        Box::pin(async move { asked.await.map_err(stopped) })
    }

    fn worker(&self, worker: WorkerId) -> Read<Option<Worker>> {
        let asked = self.books.send(GetWorker(worker));
        Box::pin(async move { asked.await.map_err(stopped) })
    }

    fn receipt(&self, job: JobId) -> Read<Option<LoggedReceipt>> {
        let asked = self.books.send(GetReceipt(job));
        Box::pin(async move {
            asked.await.map_err(stopped)?.map_err(|e| match e {
                BooksError::Corrupt { .. } => ReadError::Corrupt(e.to_string()),
                other => ReadError::Unavailable(other.to_string()),
            })
        })
    }

    fn ledger_file(&self, path: String) -> Read<Option<Vec<u8>>> {
        let dir = self.ledger_dir.clone();
        Box::pin(async move {
            // A file read: off the async runtime.
            tokio::task::spawn_blocking(move || {
                let store = troop_ledger::store::DirStore::open(&dir)
                    .map_err(|e| ReadError::Unavailable(e.to_string()))?;
                store.read(&path).map_err(ReadError::Unavailable)
            })
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?
        })
    }

    fn lag(&self) -> Read<Lag> {
        let asked = self.books.send(GetLag);
        Box::pin(async move {
            let (entries, ledger_entries, log_records) = asked.await.map_err(stopped)?;
            Ok(Lag {
                entries,
                ledger_entries,
                log_records: Some(log_records),
            })
        })
    }

    fn network(&self) -> Read<Network> {
        let asked = self.books.send(GetNetwork);
        Box::pin(async move { asked.await.map_err(stopped) })
    }
}
