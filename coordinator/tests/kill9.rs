//! `kill -9` the coordinator process with requests in flight, restart it on the
//! same data directory: balances, holds and the ledger are exactly what the
//! event log says, holds of the requests that died are voided, and troop-audit
//! accepts the ledger.

mod common;

use std::time::Duration;

use common::harness::{
    PROCESS_ADMIN, account, consumer, start_process as start, wait_for, wait_for_models,
};
use common::scripted::Script;
use troop_ledger::note::NoteVerifier;

const GRANT: u64 = 1_000_000;
const IN_FLIGHT: usize = 4;

#[test]
fn kill_9_with_requests_in_flight_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start(dir.path());
    let url = first.1.clone();
    let (acct, key) = consumer(&url, PROCESS_ADMIN, GRANT);
    let worker_url = url.clone();
    common::scripted::spawn(worker_url, Script::Stall);
    wait_for_models(&url);
    // They stall after the first token until the coordinator dies.
    common::scripted::streams_in_flight(&url, &key, IN_FLIGHT);
    wait_for("the requests to hold credits", || {
        account(&url, &key)["holds"]
            .as_array()
            .is_some_and(|h| h.len() == IN_FLIGHT)
    });
    let available: u64 = account(&url, &key)["available_micro"]
        .as_str()
        .expect("avail")
        .parse()
        .expect("n");
    assert!(available < GRANT, "the holds are reserved");

    drop(first); // SIGKILL: no shutdown path runs.

    let second = start(dir.path());
    let after = account(&second.1, &key);
    assert_eq!(
        after["holds"].as_array().expect("holds").len(),
        0,
        "holds of dead requests are voided"
    );
    assert_eq!(
        after["balance_micro"],
        GRANT.to_string(),
        "nothing was charged for them"
    );
    assert_eq!(after["available_micro"], GRANT.to_string());

    // The ledger, from the outside, agrees; and it is served by the new process.
    std::thread::sleep(Duration::from_millis(1_500));
    let vkey = std::fs::read_to_string(dir.path().join("data/ledger.vkey")).expect("vkey");
    let verifier = NoteVerifier::from_key_string(&vkey).expect("vkey");
    let source = troop_audit::Source::open(&format!("{}/ledger", second.1)).expect("source");
    let report = troop_audit::verify(&source, &verifier, None, &|_| {})
        .expect("troop-audit accepts the ledger after kill -9");
    assert_eq!(report.ledger.open_holds().count(), 0);
    let consumer: troop_schemas::AccountId = acct.parse().expect("id");
    assert_eq!(
        report
            .ledger
            .account(&consumer)
            .expect("consumer")
            .balance(),
        i128::from(GRANT)
    );
}

#[test]
fn a_restart_from_the_start_up_snapshot_serves_the_same_books() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start(dir.path());
    let (acct, key) = consumer(&first.1, PROCESS_ADMIN, GRANT);
    drop(first);
    // The second start replays the whole log and snapshots it; the third
    // starts from that snapshot and replays nothing.
    let second = start(dir.path());
    let before = account(&second.1, &key);
    drop(second);
    let snapshots: Vec<_> = std::fs::read_dir(dir.path().join("data/snapshots"))
        .expect("a snapshot was written")
        .filter_map(Result::ok)
        .collect();
    assert!(!snapshots.is_empty());
    let third = start(dir.path());
    let after = account(&third.1, &key);
    assert_eq!(after, before, "balance, holds and the key itself survive");
    assert_eq!(after["account"], acct.as_str());
}
