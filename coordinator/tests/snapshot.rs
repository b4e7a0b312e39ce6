//! Snapshots: a snapshot plus the records after it rebuilds exactly what a
//! replay of the whole log does; unusable snapshots are ignored, never trusted.

#[path = "../../ledger/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use troop_coordinator::books::{Books, BooksError};
use troop_coordinator::eventlog::EventLog;
use troop_coordinator::eventlog::file::{FileLog, FileLogConfig};
use troop_coordinator::history::WorkerEvent;
use troop_coordinator::server::BanEvent;
use troop_coordinator::snapshot::{Snapshot, catch_up};
use troop_ledger::note::NoteSigner;
use troop_schemas::{JobId, WorkerId};

fn signer() -> NoteSigner {
    NoteSigner::new("snapshot.example/ledger", log_key()).expect("signer")
}

fn log(dir: &Path) -> Arc<dyn EventLog> {
    Arc::new(FileLog::open(dir.join("events"), FileLogConfig::default()).expect("event log"))
}

/// Opens from `snapshot` (or from the start), folding the other records too.
fn reopen(dir: &Path, snapshot: Snapshot) -> Result<(Books, Snapshot), BooksError> {
    let (start, mut others) = snapshot.split();
    let (books, recovery) =
        Books::open_at(log(dir), &dir.join("ledger"), signer(), start, &mut |r| {
            others.fold_other(r)
        })?;
    Ok((books.start_here(recovery.records), others))
        .map(|(start, others)| (books, others.join(start)))
}

/// Ledger traffic with non-ledger records mixed in: a ban, worker events.
fn write_traffic(events: &Arc<dyn EventLog>, books: &mut Books, from: u64, to: u64) {
    let all = traffic(to);
    // `traffic` is deterministic: skip what an earlier call committed.
    let skip = if from == 0 { 0 } else { traffic(from).len() };
    for (i, e) in all.into_iter().enumerate().skip(skip) {
        books.commit_one(&e).expect("valid traffic");
        if i % 7 == 0 {
            let w = WorkerEvent::JobStarted {
                job: JobId::derive(&(i as u64).to_le_bytes()),
                worker: worker_id(),
                model: MODEL.into(),
                at_ms: T0 + i as u64,
            };
            events.append(vec![w.to_record()]).expect("append");
        }
    }
    let ban = BanEvent::Banned {
        worker: WorkerId::derive(&from.to_le_bytes()),
        at_ms: T0,
    };
    events.append(vec![ban.to_record()]).expect("append");
    books.publish().expect("publish");
}

#[test]
fn a_snapshot_and_the_rest_rebuild_what_a_full_replay_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = {
        let events = log(dir.path());
        let (mut books, _) =
            Books::open(Arc::clone(&events), &dir.path().join("ledger"), signer()).expect("open");
        write_traffic(&events, &mut books, 0, 40);
        let mut s = Snapshot::empty();
        catch_up(&*events, &mut s, books.published()).expect("folds");
        assert_eq!(s.offset, events.next_offset(), "everything was published");
        write_traffic(&events, &mut books, 40, 90);
        s
    };
    let snap_dir = dir.path().join("snapshots");
    snapshot.write(&snap_dir).expect("write");
    let loaded = Snapshot::latest(&snap_dir, u64::MAX).expect("loads");
    assert_eq!(loaded, snapshot, "a snapshot reads back as written");

    let (from_snapshot, others_a) = reopen(dir.path(), loaded).expect("opens from the snapshot");
    let ledger_a = from_snapshot.ledger().clone();
    let entries_a = from_snapshot.entries();
    drop(from_snapshot);
    let (full, others_b) = reopen(dir.path(), Snapshot::empty()).expect("opens in full");
    assert_eq!(ledger_a, *full.ledger());
    assert_eq!(ledger_a.balances_digest(), full.ledger().balances_digest());
    assert_eq!(entries_a, full.entries());
    assert_eq!(
        others_a, others_b,
        "every projection agrees, receipts and history included"
    );
    assert_eq!(others_b.bans.len(), 2);
    assert!(
        others_b
            .history
            .get(&worker_id())
            .is_some_and(|r| r.jobs_started > 0)
    );
    assert!(!others_b.receipts.is_empty());
}

#[test]
fn unusable_snapshots_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap_dir = dir.path().join("snapshots");
    let mut good = Snapshot::empty();
    good.offset = 5;
    good.write(&snap_dir).expect("write");
    let mut newer = Snapshot::empty();
    newer.offset = 9;
    let path = newer.write(&snap_dir).expect("write");
    // A flipped byte: the digest no longer matches.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[3] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    assert_eq!(Snapshot::latest(&snap_dir, 100).map(|s| s.offset), Some(5));
    assert_eq!(
        Snapshot::latest(&snap_dir, 4).map(|s| s.offset),
        None,
        "a snapshot past the end of the log belongs to another log"
    );
    for n in [11u64, 12, 13] {
        let mut s = Snapshot::empty();
        s.offset = n;
        s.write(&snap_dir).expect("write");
    }
    assert_eq!(
        std::fs::read_dir(&snap_dir).expect("dir").count(),
        2,
        "only the newest are kept"
    );
}

#[test]
fn a_snapshot_past_the_published_ledger_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ahead = Snapshot::empty();
    ahead.entries = 3;
    ahead.offset = 3;
    assert!(matches!(
        reopen(dir.path(), ahead),
        Err(BooksError::SnapshotAhead { .. })
    ));
}
