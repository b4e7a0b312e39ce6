//! Rotating the log key (RUNBOOK.md) on the embedded default, with the real
//! binary: the old key moved to `ledger.previous.key`, a new `ledger.key`,
//! a restart. The same tree is signed on with the new key, the rotation is a
//! ledger entry, and an auditor proves that the new key's ledger extends the
//! old key's last checkpoint.

mod common;

use common::harness::{PROCESS_ADMIN, admin, consumer, start_process, wait_for};
use serde_json::json;
use troop_audit::{AuditError, Report, Source};
use troop_ledger::note::NoteVerifier;
use troop_schemas::{AccountId, PublicKey};

const GRANT: u64 = 1_000_000;
const NEW_SEED: [u8; 32] = [0x5a; 32];

fn verifier(data: &std::path::Path) -> NoteVerifier {
    let text = std::fs::read_to_string(data.join("ledger.vkey")).expect("vkey");
    NoteVerifier::from_key_string(text.trim()).expect("vkey parses")
}

fn balance(report: &Report, account: &AccountId) -> i128 {
    report.ledger.account(account).map_or(0, |a| a.balance())
}

#[test]
fn a_new_log_key_signs_the_same_ledger_on_and_auditors_follow_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let first = start_process(dir.path());
    let (account, key) = consumer(&first.1, PROCESS_ADMIN, GRANT);
    let id: AccountId = account.parse().expect("account id");
    let old_key = verifier(&data);
    let source = |url: &str| Source::open(&format!("{url}/ledger")).expect("source");
    wait_for("a checkpoint with the grant", || {
        troop_audit::verify(&source(&first.1), &old_key, None, &|_| {})
            .is_ok_and(|r| balance(&r, &id) == i128::from(GRANT))
    });
    drop(first); // SIGKILL
    // The old key's last statement, as an auditor kept it.
    let old_note = std::fs::read_to_string(data.join("ledger/checkpoint")).expect("checkpoint");

    std::fs::rename(data.join("ledger.key"), data.join("ledger.previous.key")).expect("move");
    std::fs::write(data.join("ledger.key"), hex::encode(NEW_SEED)).expect("new key");
    let second = start_process(dir.path());
    let new_key = verifier(&data);
    assert_ne!(new_key, old_key, "ledger.vkey names the new key");
    admin(
        &second.1,
        PROCESS_ADMIN,
        "/admin/grants",
        json!({"account": account, "amount_micro": GRANT}),
    );
    let mut report = None;
    wait_for("the new key's checkpoint with the second grant", || {
        match troop_audit::verify_across_rotation(
            &source(&second.1),
            &new_key,
            Some((&old_note, &old_key)),
            &|_| {},
        ) {
            Ok(r) if balance(&r, &id) == 2 * i128::from(GRANT) => {
                report = Some(r);
                true
            }
            _ => false,
        }
    });
    let report = report.expect("set above");
    let old_size = troop_ledger::note::Checkpoint::open(&old_note, &old_key)
        .expect("old note")
        .size;
    assert_eq!(report.since_size, Some(old_size));
    // The ledger itself names the key that signs it now.
    let new_public = PublicKey(
        ed25519_dalek::SigningKey::from_bytes(&NEW_SEED)
            .verifying_key()
            .to_bytes(),
    );
    assert_eq!(
        report.ledger.log_key(),
        Some(&("troop.local/ledger".to_owned(), new_public))
    );
    // Neither key vouches for the other's statements.
    assert!(matches!(
        troop_audit::verify(&source(&second.1), &old_key, None, &|_| {}),
        Err(AuditError::Checkpoint(_))
    ));
    assert!(matches!(
        troop_audit::verify(&source(&second.1), &new_key, Some(&old_note), &|_| {}),
        Err(AuditError::OldCheckpoint(_))
    ));

    // Started again with the previous key still there: the new key's own
    // checkpoint is taken as it is, and the books are whole.
    drop(second);
    let third = start_process(dir.path());
    assert_eq!(
        common::harness::account(&third.1, &key)["balance_micro"],
        (2 * GRANT).to_string()
    );
    troop_audit::verify_across_rotation(
        &source(&third.1),
        &new_key,
        Some((&old_note, &old_key)),
        &|_| {},
    )
    .expect("the ledger after a second start");
}
