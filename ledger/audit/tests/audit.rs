//! `troop-audit` against real logs on disk and over HTTP, honest and tampered.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use troop_audit::{AuditError, Source, verify};
use troop_ledger::fold::{FoldError, Ledger};
use troop_ledger::note::{NoteSigner, NoteVerifier};
use troop_ledger::receipt::ReceiptError;
use troop_ledger::store::DirStore;
use troop_ledger::writer::LogWriter;
use troop_schemas::{Event, encode_entry};

const ORIGIN: &str = "test.example/log";

struct Log {
    dir: tempfile::TempDir,
    key: NoteVerifier,
    /// Every checkpoint note published, oldest first.
    checkpoints: Vec<String>,
}

impl Log {
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn base(&self) -> String {
        self.path().display().to_string()
    }
}

/// Writes `events` through the real writer, unchecked (so tests can log bad
/// events), publishing every `every` entries.
fn write_log(events: &[Event], every: usize) -> Log {
    let dir = tempfile::tempdir().expect("tempdir");
    let signer = NoteSigner::new(ORIGIN, log_key()).expect("signer");
    let key = signer.verifier();
    let mut w = LogWriter::open(DirStore::open(dir.path()).expect("store"), signer).expect("open");
    let mut checkpoints = Vec::new();
    for (i, e) in events.iter().enumerate() {
        w.append(encode_entry(e).expect("encodes")).expect("append");
        if (i + 1) % every == 0 {
            w.publish().expect("publish");
            checkpoints
                .push(std::fs::read_to_string(dir.path().join("checkpoint")).expect("checkpoint"));
        }
    }
    w.publish().expect("publish");
    checkpoints.push(std::fs::read_to_string(dir.path().join("checkpoint")).expect("checkpoint"));
    std::fs::write(dir.path().join("vkey"), key.to_key_string()).expect("vkey");
    Log {
        dir,
        key,
        checkpoints,
    }
}

fn audit(log: &Log, since: Option<&str>) -> Result<troop_audit::Report, AuditError> {
    verify(&Source::open(&log.base())?, &log.key, since, &|_| {})
}

fn honest() -> (Vec<Event>, Log) {
    let events = traffic(400);
    let log = write_log(&events, 97);
    (events, log)
}

#[test]
fn an_honest_log_verifies_and_replays_to_the_writers_balances() {
    let (events, log) = honest();
    let report = audit(&log, None).expect("honest log verifies");
    assert_eq!(report.entries, events.len() as u64);
    assert_eq!(report.receipts, 267);
    assert_eq!(report.signatures, 2 * 267);
    let mut expected = Ledger::new();
    for e in &events {
        expected.apply(e).expect("valid");
    }
    assert_eq!(report.ledger.balances_digest(), expected.balances_digest());
    // Every earlier checkpoint is a prefix of the current log.
    for old in &log.checkpoints {
        let r = audit(&log, Some(old)).expect("extends every older checkpoint");
        assert!(r.since_size.is_some());
    }
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).expect("read");
    b[at] ^= 0x01;
    std::fs::write(path, b).expect("write");
}

#[test]
fn a_flipped_entry_byte_is_named() {
    let (_, log) = honest();
    // Byte 100 of the first bundle lies inside entry 1 or 2.
    flip_byte(&log.path().join("tile/entries/000"), 100);
    match audit(&log, None) {
        Err(AuditError::Tile { path, reason }) => {
            assert_eq!(path, "tile/0/000");
            assert!(reason.contains("hash of entry"), "{reason}");
        }
        other => panic!("expected a tile mismatch, got {other:?}"),
    }
}

#[test]
fn a_flipped_tile_byte_is_named() {
    let (_, log) = honest();
    flip_byte(&log.path().join("tile/0/001"), 40);
    match audit(&log, None) {
        Err(AuditError::Tile { path, .. }) => assert_eq!(path, "tile/0/001"),
        other => panic!("expected a tile mismatch, got {other:?}"),
    }
}

#[test]
fn a_flipped_checkpoint_or_signature_is_refused() {
    let (_, log) = honest();
    let cp = log.path().join("checkpoint");
    let text = std::fs::read_to_string(&cp).expect("checkpoint");
    // The size line, changed by one.
    let size: u64 = text
        .lines()
        .nth(1)
        .expect("size line")
        .parse()
        .expect("number");
    std::fs::write(
        &cp,
        text.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size - 1), 1),
    )
    .expect("write");
    assert!(matches!(audit(&log, None), Err(AuditError::Checkpoint(_))));
    // The signature itself, changed in its last base64 character before the newline.
    let mut sig = text.into_bytes();
    let at = sig.len() - 3;
    sig[at] = if sig[at] == b'A' { b'B' } else { b'A' };
    std::fs::write(&cp, sig).expect("write");
    assert!(matches!(audit(&log, None), Err(AuditError::Checkpoint(_))));
}

#[test]
fn a_forged_receipt_signature_is_named_by_index() {
    let mut events = traffic(50);
    let target = events
        .iter()
        .position(|e| matches!(e, Event::HoldSettled { .. }))
        .expect("a settlement")
        + 20;
    let target = (target..events.len())
        .find(|&i| matches!(events[i], Event::HoldSettled { .. }))
        .expect("later one");
    if let Event::HoldSettled { receipt, .. } = &mut events[target] {
        // The worker claims more output than it signed for.
        receipt.receipt.output_tokens += 1;
    }
    let log = write_log(&events, 1000);
    match audit(&log, None) {
        Err(AuditError::Receipt { index, source }) => {
            assert_eq!(index, target as u64);
            assert_eq!(source, ReceiptError::BadSignature { who: "worker" });
        }
        other => panic!("expected a receipt failure, got {other:?}"),
    }
}

#[test]
fn settling_a_hold_twice_is_named_by_index() {
    let mut events = traffic(20);
    let settled = events
        .iter()
        .find(|e| matches!(e, Event::HoldSettled { .. }))
        .expect("a settlement")
        .clone();
    events.push(settled);
    let log = write_log(&events, 1000);
    match audit(&log, None) {
        Err(AuditError::Fold {
            index,
            source: FoldError::HoldNotOpen(_),
        }) => assert_eq!(index, events.len() as u64 - 1),
        other => panic!("expected a double settlement, got {other:?}"),
    }
}

#[test]
fn an_overdraft_is_named_by_index() {
    let mut events = traffic(10);
    events.push(Event::Transfer {
        from: consumer(),
        to: worker_account(),
        amount_micro: m(10_000_001),
        memo: String::new(),
        at_ms: T0,
    });
    let log = write_log(&events, 1000);
    match audit(&log, None) {
        Err(AuditError::Fold {
            index,
            source: FoldError::InsufficientFunds { .. },
        }) => {
            assert_eq!(index, events.len() as u64 - 1)
        }
        other => panic!("expected an overdraft, got {other:?}"),
    }
}

#[test]
fn a_forked_log_is_not_an_extension_of_the_old_checkpoint() {
    let (_, log) = honest();
    // Same key, same length, one entry different: a split view.
    let mut forked_events = traffic(400);
    forked_events[3] = Event::AccountOpened {
        account: troop_schemas::AccountId::derive(b"fork"),
        role: troop_schemas::AccountRole::Consumer,
        at_ms: T0,
    };
    let fork = write_log(&forked_events, 97);
    let old = &fork.checkpoints[1];
    assert!(matches!(
        audit(&log, Some(old)),
        Err(AuditError::NotAnExtension(_))
    ));
}

#[test]
fn a_missing_tile_is_named() {
    let (_, log) = honest();
    std::fs::remove_file(log.path().join("tile/entries/001")).expect("remove");
    match audit(&log, None) {
        Err(AuditError::Fetch { path, .. }) => assert_eq!(path, "tile/entries/001"),
        other => panic!("expected a missing bundle, got {other:?}"),
    }
}

/// Serves the log with Python's own static file server: a real HTTP server we did not write.
struct HttpServer(std::process::Child, String);

impl HttpServer {
    fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 is installed");
        // Owned from here on: killed and reaped on drop, also if we panic below.
        let server = Self(child, format!("http://127.0.0.1:{port}"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("http.server did not start");
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn verifies_over_http() {
    let (_, log) = honest();
    let server = HttpServer::start(log.path());
    let source = Source::open(&format!("{}/", server.1)).expect("http source");
    let report =
        verify(&source, &log.key, Some(&log.checkpoints[0]), &|_| {}).expect("verifies over HTTP");
    assert_eq!(report.receipts, 267);
    flip_byte(&log.path().join("tile/0/000"), 0);
    assert!(matches!(
        verify(&source, &log.key, None, &|_| {}),
        Err(AuditError::Tile { .. })
    ));
}

/// Runs `troop-audit` with `args`.
fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_troop-audit"))
        .args(args)
        .output()
        .expect("troop-audit runs")
}

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn the_cli_verifies_proves_and_reports_balances() {
    let (_, log) = honest();
    let base = log.base();
    let p = |name: &str| log.path().join(name).display().to_string();
    let vkey = p("vkey");
    let ok = cli(&["verify", &base, "--key", &vkey]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("OK: 807 entries, 267 receipts"));

    std::fs::write(p("old-checkpoint"), &log.checkpoints[2]).expect("write");
    let since = stdout_json(&cli(&[
        "verify",
        &base,
        "--json",
        "--since",
        &p("old-checkpoint"),
        "--key",
        &vkey,
    ]));
    assert_eq!(since["ok"], true);
    assert_eq!(since["since_size"], 291);

    let proof = cli(&[
        "prove",
        &base,
        "--index",
        "500",
        "--entry-out",
        &p("entry-500"),
        "--key",
        &vkey,
    ]);
    assert!(
        proof.status.success(),
        "{}",
        String::from_utf8_lossy(&proof.stderr)
    );
    assert!(
        String::from_utf8_lossy(&proof.stdout).starts_with("c2sp.org/tlog-proof@v1\nindex 500\n")
    );
    std::fs::write(p("500.tlog-proof"), &proof.stdout).expect("write");
    let check = || {
        cli(&[
            "proof",
            &p("500.tlog-proof"),
            "--entry",
            &p("entry-500"),
            "--key",
            &vkey,
        ])
    };
    let checked = check();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    flip_byte(&log.path().join("entry-500"), 5);
    assert_eq!(check().status.code(), Some(1));

    let account = worker_account().to_string();
    let balances = stdout_json(&cli(&[
        "balances",
        &base,
        "--json",
        "--account",
        &account,
        "--key",
        &vkey,
    ]));
    assert_eq!(balances["accounts"].as_array().expect("list").len(), 1);
    assert!(
        balances["accounts"][0]["balance_micro"]
            .as_str()
            .expect("string")
            .parse::<i64>()
            .expect("number")
            > 0
    );

    flip_byte(&log.path().join("tile/0/002"), 7);
    let tampered = cli(&["verify", &base, "--key", &vkey]);
    assert_eq!(tampered.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&tampered.stderr).contains("tile/0/002"));
}

#[test]
fn the_cli_follows_the_log_across_a_key_rotation() {
    let events = traffic(400);
    let (before, after) = events.split_at(300);
    let log = write_log(before, 1_000);
    let old_note = log.checkpoints.last().expect("checkpoint").clone();
    // The key rotated: the writer takes the tree over with the new key
    // (signing the same tree again) and goes on.
    let new =
        NoteSigner::new(ORIGIN, ed25519_dalek::SigningKey::from_bytes(&[77; 32])).expect("signer");
    let mut w = LogWriter::open_rotated(
        DirStore::open(log.path()).expect("store"),
        new.clone(),
        Some(&log.key),
    )
    .expect("rotated");
    for e in after {
        w.append(encode_entry(e).expect("encodes")).expect("append");
    }
    w.publish().expect("publish");
    let p = |name: &str| log.path().join(name).display().to_string();
    std::fs::write(p("old-checkpoint"), &old_note).expect("write");
    std::fs::write(p("new-vkey"), new.verifier().to_key_string()).expect("vkey");
    let base = log.base();
    let across = stdout_json(&cli(&[
        "verify",
        &base,
        "--json",
        "--key",
        &p("new-vkey"),
        "--since",
        &p("old-checkpoint"),
        "--since-key",
        &p("vkey"),
    ]));
    assert_eq!(across["ok"], true, "{across}");
    assert_eq!(across["size"], events.len());
    assert_eq!(across["since_size"], before.len());
    // The old checkpoint is not the new key's statement, nor the log the old key's.
    let same_key = cli(&[
        "verify",
        &base,
        "--key",
        &p("new-vkey"),
        "--since",
        &p("old-checkpoint"),
    ]);
    assert!(!same_key.status.success());
    assert!(
        String::from_utf8_lossy(&same_key.stderr).contains("old checkpoint"),
        "{}",
        String::from_utf8_lossy(&same_key.stderr)
    );
    assert!(
        !cli(&["verify", &base, "--key", &p("vkey")])
            .status
            .success()
    );
}
