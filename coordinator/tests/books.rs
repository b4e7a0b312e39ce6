//! The books on the embedded event log: durable before acknowledged, rebuilt by
//! replay, and published as a ledger that troop-audit accepts after any stop.

#[path = "../../ledger/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::*;
use troop_coordinator::books::{Books, BooksError, MAX_EXPIRIES_PER_ROUND, due_expiries};
use troop_coordinator::eventlog::file::{FileLog, FileLogConfig};
use troop_coordinator::eventlog::{EventLog, EventLogError, Pending, Record};
use troop_ledger::fold::{FoldError, Hold, Ledger};
use troop_ledger::note::NoteSigner;
use troop_schemas::{Event, HoldId, JobId, VoidReason};

fn signer() -> NoteSigner {
    NoteSigner::new("books.example/ledger", log_key()).expect("signer")
}

fn open(dir: &Path) -> (Books, troop_coordinator::books::Recovery) {
    let events: Arc<dyn EventLog> =
        Arc::new(FileLog::open(dir.join("events"), FileLogConfig::default()).expect("event log"));
    Books::open(events, &dir.join("ledger"), signer()).expect("books open")
}

fn audit(dir: &Path) -> troop_audit::Report {
    let source =
        troop_audit::Source::open(&dir.join("ledger").display().to_string()).expect("source");
    troop_audit::verify(&source, &signer().verifier(), None, &|_| {})
        .expect("troop-audit accepts the ledger")
}

#[test]
fn committed_events_survive_a_stop_before_publication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = traffic(120);
    let digest = {
        let (mut books, rec) = open(dir.path());
        assert_eq!(rec.entries, 0);
        for chunk in events.chunks(7) {
            for v in books.commit(chunk).expect("commit") {
                v.expect("valid traffic");
            }
        }
        books.publish().expect("publish");
        // More traffic, then the process dies before the next checkpoint.
        books.commit_one(&hold(1_000, 500)).expect("hold");
        books.ledger().balances_digest()
    };
    let (books, rec) = open(dir.path());
    assert_eq!(rec.entries, events.len() as u64 + 1);
    assert_eq!(
        rec.republished, 1,
        "the unpublished entry is re-published from the event log"
    );
    assert_eq!(books.ledger().balances_digest(), digest);
    let report = audit(dir.path());
    assert_eq!(report.entries, events.len() as u64 + 1);
    assert_eq!(
        report.ledger.balances_digest(),
        digest,
        "auditors see exactly the books"
    );
}

#[test]
fn refused_events_leave_no_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut books, _) = open(dir.path());
    for v in books.commit(&genesis()).expect("commit") {
        v.expect("genesis");
    }
    let before = (books.entries(), books.ledger().balances_digest());
    let overdraft = Event::Transfer {
        from: consumer(),
        to: worker_account(),
        amount_micro: m(10_000_001),
        memo: String::new(),
        at_ms: T0,
    };
    let verdicts = books.commit(&[overdraft, hold(1, 100)]).expect("commit");
    assert!(matches!(
        verdicts[0],
        Err(BooksError::Refused(FoldError::InsufficientFunds { .. }))
    ));
    assert_eq!(
        verdicts[1].as_ref().expect("the valid one goes through"),
        &before.0
    );
    drop(books);
    let (books, rec) = open(dir.path());
    assert_eq!(
        rec.entries,
        before.0 + 1,
        "only the accepted event was logged"
    );
    assert_ne!(books.ledger().balances_digest(), before.1);
}

#[test]
fn holds_of_dead_requests_are_voided_on_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut books, _) = open(dir.path());
        for v in books.commit(&genesis()).expect("commit") {
            v.expect("genesis");
        }
        books.commit(&[hold(1, 100), hold(2, 200)]).expect("holds");
    }
    let (mut books, _) = open(dir.path());
    assert_eq!(books.ledger().open_holds().count(), 2);
    assert_eq!(books.void_orphaned_holds(T0 + 5).expect("void"), 2);
    let c = books.ledger().account(&consumer()).expect("consumer");
    assert_eq!(c.debits_pending, 0);
    assert_eq!(c.balance(), 10_000_000, "nothing was charged");
    books.publish().expect("publish");
    assert_eq!(audit(dir.path()).ledger.open_holds().count(), 0);
}

/// The expiries the embedded books and every cluster owner make: due holds
/// only (the deadline inclusive), those the caller takes, in hold id order,
/// at most a round's worth.
#[test]
fn due_expiries_are_the_due_holds_taken_in_id_order_a_round_at_a_time() {
    let mut ledger = Ledger::new();
    let max = MAX_EXPIRIES_PER_ROUND as u64;
    let events = genesis()
        .into_iter()
        .chain((1..=max + 2).map(|n| hold(n, 1)));
    for event in events {
        ledger.apply(&event).expect("folds");
    }
    let none = BTreeSet::new();
    assert!(due_expiries(&ledger, T0 + 60_000, &none, |_| true).is_empty());
    // Each expiry's hold, checked to be dated `now_ms`.
    let ids = |due: Vec<Event>, now_ms: u64| -> Vec<HoldId> {
        due.into_iter()
            .map(|e| match e {
                Event::HoldExpired { hold, at_ms } if at_ms == now_ms => hold,
                other => panic!("not an expiry at {now_ms}: {other:?}"),
            })
            .collect()
    };
    let mut expected: Vec<HoldId> = [1u64, 2]
        .iter()
        .map(|n| HoldId::derive(&n.to_le_bytes()))
        .collect();
    expected.sort_unstable();
    let now_ms = T0 + 60_002;
    assert_eq!(
        ids(due_expiries(&ledger, now_ms, &none, |_| true), now_ms),
        expected,
        "holds 1 and 2, at their deadlines"
    );
    let second = |h: &Hold| h.job == JobId::derive(&2u64.to_le_bytes());
    assert_eq!(
        ids(due_expiries(&ledger, now_ms, &none, second), now_ms),
        [HoldId::derive(&2u64.to_le_bytes())]
    );
    let now_ms = T0 + 60_000 + max + 2;
    let all_ids = ids(due_expiries(&ledger, now_ms, &none, |_| true), now_ms);
    assert_eq!(all_ids.len(), MAX_EXPIRIES_PER_ROUND, "a round's worth");
    assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "in id order");
}

/// A cluster owner voids the holds whose node died (their origin is gone)
/// before their deadline, and expires the overdue ones of every origin.
#[test]
fn holds_of_a_dead_node_are_voided_and_others_wait_for_their_deadline() {
    let mut ledger = Ledger::new();
    for event in genesis() {
        ledger.apply(&event).expect("folds");
    }
    let from = |n: u64, origin: Option<&str>| {
        let mut e = hold(n, 1);
        if let Event::HoldPlaced { origin: o, .. } = &mut e {
            *o = origin.map(str::to_owned);
        }
        e
    };
    for event in [
        from(1, Some("gone/1")),
        from(2, Some("alive/1")),
        from(3, None),
    ] {
        ledger.apply(&event).expect("folds");
    }
    let dead: BTreeSet<String> = ["gone/1".to_owned()].into();
    let held = |n: u64| HoldId::derive(&n.to_le_bytes());
    assert_eq!(
        due_expiries(&ledger, T0, &dead, |_| true),
        [Event::HoldVoided {
            hold: held(1),
            reason: VoidReason::CoordinatorRestart,
            at_ms: T0,
        }],
        "only the dead node's hold, before any deadline"
    );
    // Holds 1 and 2 are overdue at T0 + 60_002, hold 3 is not.
    let overdue = due_expiries(&ledger, T0 + 60_002, &dead, |_| true);
    assert_eq!(overdue.len(), 2, "{overdue:?}");
    assert!(
        overdue
            .iter()
            .all(|e| matches!(e, Event::HoldExpired { .. })),
        "an overdue hold expires whatever its origin: {overdue:?}"
    );
}

#[test]
fn holds_past_their_deadline_expire_and_release_their_credits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut books, _) = open(dir.path());
    for v in books.commit(&genesis()).expect("commit") {
        v.expect("genesis");
    }
    books.commit(&[hold(1, 100), hold(2, 200)]).expect("holds");
    // hold(n) expires at T0 + n + 60_000.
    assert_eq!(books.expire_holds(T0 + 60_000).expect("expire"), 0);
    assert_eq!(books.expire_holds(T0 + 60_001).expect("expire"), 1);
    assert_eq!(books.ledger().open_holds().count(), 1);
    assert_eq!(books.expire_holds(T0 + 90_000).expect("expire"), 1);
    let c = books.ledger().account(&consumer()).expect("consumer");
    assert_eq!((c.debits_pending, c.balance()), (0, 10_000_000));
    books.publish().expect("publish");
    drop(books);
    let (books, _) = open(dir.path());
    assert_eq!(
        books.ledger().open_holds().count(),
        0,
        "expiries are in the log"
    );
    assert_eq!(audit(dir.path()).ledger.open_holds().count(), 0);
}

/// An event log whose appends fail, as a full disk would.
struct FullDisk;

impl EventLog for FullDisk {
    /// Queued, then the fsync fails.
    fn submit(&self, records: Vec<Vec<u8>>) -> Result<Pending, EventLogError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Err(EventLogError::Io {
            path: "disk".into(),
            source: std::io::Error::other("no space left on device"),
        }));
        Ok(Pending::new(0, records.len() as u64, rx))
    }
    fn read(&self, _: u64, _: usize) -> Result<Vec<Record>, EventLogError> {
        Ok(Vec::new())
    }
    fn next_offset(&self) -> u64 {
        0
    }
}

#[test]
fn a_failed_append_stops_the_books() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut books, _) = Books::open(Arc::new(FullDisk), dir.path(), signer()).expect("open");
    assert!(matches!(
        books.commit(&genesis()),
        Err(BooksError::EventLog(_))
    ));
    assert!(
        matches!(books.commit(&genesis()), Err(BooksError::Poisoned)),
        "no decision after an unknown write"
    );
}

/// Where a test answers an append's durability.
type Durable = tokio::sync::oneshot::Sender<Result<u64, EventLogError>>;

/// A file log whose records become durable only when the test says so.
struct SlowDisk {
    log: FileLog,
    held: std::sync::Mutex<Vec<Vec<Vec<u8>>>>,
    waiting: std::sync::Mutex<Vec<(u64, Durable)>>,
    next: std::sync::atomic::AtomicU64,
}

impl SlowDisk {
    fn release(&self) {
        for records in self.held.lock().expect("lock").drain(..) {
            self.log.append(records).expect("append");
        }
        for (first, tx) in self.waiting.lock().expect("lock").drain(..) {
            let _ = tx.send(Ok(first));
        }
    }
}

impl EventLog for SlowDisk {
    fn submit(&self, records: Vec<Vec<u8>>) -> Result<Pending, EventLogError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let count = records.len() as u64;
        let first = self
            .next
            .fetch_add(count, std::sync::atomic::Ordering::SeqCst);
        self.held.lock().expect("lock").push(records);
        self.waiting.lock().expect("lock").push((first, tx));
        Ok(Pending::new(first, count, rx))
    }
    fn read(&self, from: u64, max: usize) -> Result<Vec<Record>, EventLogError> {
        self.log.read(from, max)
    }
    fn next_offset(&self) -> u64 {
        self.log.next_offset()
    }
}

#[test]
fn no_checkpoint_covers_an_entry_before_its_record_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(SlowDisk {
        log: FileLog::open(dir.path().join("events"), FileLogConfig::default()).expect("log"),
        held: std::sync::Mutex::default(),
        waiting: std::sync::Mutex::default(),
        next: std::sync::atomic::AtomicU64::new(0),
    });
    let (mut books, _) = Books::open(
        Arc::clone(&disk) as Arc<dyn EventLog>,
        &dir.path().join("ledger"),
        signer(),
    )
    .expect("open");
    let (verdicts, pending) = books.submit(&genesis()).expect("submit");
    assert!(verdicts.iter().all(Result::is_ok));
    let (size, _) = books.publish().expect("publish");
    assert_eq!(size, 0, "queued but not durable: not in any checkpoint");
    assert_eq!(
        books.ledger().account(&consumer()).map(|a| a.balance()),
        Some(10_000_000),
        "the projection judges later events with it already"
    );
    disk.release();
    pending.expect("accepted").wait().expect("durable");
    let (size, _) = books.publish().expect("publish");
    assert_eq!(size, genesis().len() as u64);
}

#[test]
fn a_ledger_from_another_event_log_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut books, _) = open(dir.path());
        books.commit(&genesis()).expect("commit");
        books.publish().expect("publish");
    }
    std::fs::remove_dir_all(dir.path().join("events")).expect("lose the event log");
    let events: Arc<dyn EventLog> =
        Arc::new(FileLog::open(dir.path().join("events"), FileLogConfig::default()).expect("log"));
    assert!(matches!(
        Books::open(events, &dir.path().join("ledger"), signer()),
        Err(BooksError::Corrupt { .. })
    ));
}
