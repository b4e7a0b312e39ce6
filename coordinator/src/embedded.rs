//! The embedded books behind the [`Money`] and [`Reads`] ports: one judge for
//! every account behind one short lock, taken on the thread that asks (an
//! account's actor), so a verdict costs no thread hop; the ledger log's
//! integration (tiles, checkpoints, proofs) runs apart ([`Integration`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use troop_ledger::fold::{Account, Hold, Schedule, Worker};
use troop_ledger::tile::TileSource as _;
use troop_schemas::{AccountId, Event, HoldId, JobId, WorkerId};

use crate::books::{Books, BooksError, Integration};
use crate::directory::Directory;
use crate::eventlog::EventLog;
use crate::money::{Home, Judged, Money, MoneyError, Refusal};
use crate::reads::{
    AccountView, Lag, LoggedReceipt, MAX_LIST_ACCOUNTS, Network, Read, ReadError, Reads,
};

/// The price schedule in force, as the books last judged it: read on every
/// request without taking the books' lock. Requests priced a moment
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

/// The embedded books, shared by every thread that judges or reads.
///
/// The lock is held for a judgement (fold checks, encoding, a hand-over to
/// the event log's writer: microseconds) or a read; never across a wait for
/// durability, a file write or an fsync, which is what lets it be taken on an
/// HTTP worker. Anything that scans every account or hold runs off the async
/// runtime ([`Embedded::blocking`]).
#[derive(Clone)]
pub struct Embedded {
    books: Arc<Mutex<Books>>,
    integration: Arc<Integration>,
    schedule: PublishedSchedule,
    /// The books' event log: directory records go there directly (no fold
    /// judges them), sharing its group commits.
    events: Arc<dyn EventLog>,
    ledger_dir: PathBuf,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("ledger_dir", &self.ledger_dir)
            .finish_non_exhaustive()
    }
}

impl Embedded {
    /// Shares `books` (opened, caught up and published) among the threads
    /// that judge; `schedule` follows every price change they accept.
    pub fn new(
        books: Books,
        schedule: PublishedSchedule,
        events: Arc<dyn EventLog>,
        ledger_dir: PathBuf,
    ) -> Self {
        schedule.refresh(&books);
        Self {
            integration: books.integration(),
            books: Arc::new(Mutex::new(books)),
            schedule,
            events,
            ledger_dir,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Books> {
        // A panic while judging left the books unknown: crash-only, like the fold's assertions.
        self.books.lock().expect("books lock")
    }

    /// Runs `f` on the books off the async runtime (scans).
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Books) -> T + Send + 'static,
    ) -> futures_util::future::BoxFuture<'static, Result<T, ReadError>> {
        let books = Arc::clone(&self.books);
        Box::pin(off_runtime(move || f(&books.lock().expect("books lock"))))
    }

    /// One tick of the books' clock, off the async runtime: expires the
    /// holds past their deadline (how many), then signs a new checkpoint if
    /// anything changed, outside the books' lock.
    pub async fn tick(
        &self,
        now_ms: u64,
    ) -> Result<
        (
            Result<usize, BooksError>,
            Result<(u64, troop_ledger::Hash), BooksError>,
        ),
        ReadError,
    > {
        let books = Arc::clone(&self.books);
        let integration = Arc::clone(&self.integration);
        off_runtime(move || {
            let expired = books.lock().expect("books lock").expire_holds(now_ms);
            (expired, integration.publish())
        })
        .await
    }
}

/// Runs `f` on tokio's blocking pool; a panic in it goes on in the caller
/// (crash-only), a runtime that stopped first is an unavailable read.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ReadError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => Ok(t),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ReadError::Unavailable(e.to_string())),
    }
}

impl Money for Embedded {
    fn change(
        &self,
        _: Home,
        events: Vec<Event>,
    ) -> futures_util::future::BoxFuture<'static, Result<Judged, MoneyError>> {
        // Judged here, in the caller's order.
        let submitted = {
            let mut books = self.lock();
            let submitted = books.submit(&events);
            if events
                .iter()
                .any(|e| matches!(e, Event::PriceSchedulePublished { .. }))
            {
                self.schedule.refresh(&books);
            }
            submitted
        };
        Box::pin(async move {
            let (verdicts, pending) =
                submitted.map_err(|e| MoneyError::Unavailable(e.to_string()))?;
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

impl Reads for Embedded {
    fn account(&self, account: AccountId) -> Read<Option<AccountView>> {
        // Scans the open holds.
        self.blocking(move |books| {
            let ledger = books.ledger();
            let found = ledger.account(&account)?.clone();
            let mut holds: Vec<(HoldId, Hold)> = ledger
                .open_holds()
                .filter(|(_, h)| h.account == account)
                .map(|(id, h)| (*id, h.clone()))
                .collect();
            holds.sort_by_key(|(id, _)| *id);
            Some(AccountView {
                account: found,
                holds,
            })
        })
    }

    fn accounts(&self, after: Option<AccountId>, limit: usize) -> Read<Vec<(AccountId, Account)>> {
        // Scans every account.
        self.blocking(move |books| {
            let mut page: Vec<_> = books
                .ledger()
                .accounts()
                .filter(|(id, _)| after.is_none_or(|after| **id > after))
                .map(|(id, a)| (*id, a.clone()))
                .collect();
            page.sort_by_key(|(id, _)| *id);
            page.truncate(limit.min(MAX_LIST_ACCOUNTS));
            page
        })
    }

    fn worker(&self, worker: WorkerId) -> Read<Option<Worker>> {
        let found = self.lock().ledger().worker(&worker).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn receipt(&self, job: JobId) -> Read<Option<LoggedReceipt>> {
        let index = self.lock().receipt_index(&job);
        let integration = Arc::clone(&self.integration);
        Box::pin(async move {
            let Some(index) = index else {
                return Ok(None);
            };
            // May sign a checkpoint: off the async runtime.
            off_runtime(move || integration.receipt(index))
                .await?
                .map_err(|e| match e {
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
        let (entries, ledger_entries) = {
            let books = self.lock();
            (books.entries(), books.lag())
        };
        let lag = Lag {
            entries,
            ledger_entries,
            log_records: Some(self.integration.undurable()),
        };
        Box::pin(async move { Ok(lag) })
    }

    fn network(&self) -> Read<Network> {
        let network = Network::of(self.lock().ledger());
        Box::pin(async move { Ok(network) })
    }
}
