//! The embedded event log: the shared conformance suite, plus crash recovery
//! (a torn tail at every byte), segment rolling and damage detection.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use troop_coordinator::eventlog::file::{FileLog, FileLogConfig};
use troop_coordinator::eventlog::{EventLog, EventLogError};

fn open(dir: &Path) -> FileLog {
    FileLog::open(dir, FileLogConfig::default()).expect("open")
}

troop_coordinator::event_log_conformance!(open);

fn small_segments(dir: &Path) -> FileLog {
    FileLog::open(
        dir,
        FileLogConfig {
            segment_bytes: 4096,
            ..FileLogConfig::default()
        },
    )
    .expect("open")
}

mod rolled {
    use super::*;
    troop_coordinator::event_log_conformance!(small_segments);
}

#[test]
fn a_torn_tail_is_truncated_at_every_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path());
        log.append((0..10u8).map(|i| vec![i; 20]).collect())
            .expect("append");
    }
    let seg = dir.path().join(format!("{:020}.log", 0));
    let full = std::fs::read(&seg).expect("segment");
    assert_eq!(full.len(), 10 * 28);
    // A crash can leave any prefix of the last write on disk.
    for cut in 0..full.len() {
        std::fs::write(&seg, &full[..cut]).expect("cut");
        let log = open(dir.path());
        let whole = (cut / 28) as u64;
        assert_eq!(log.next_offset(), whole, "cut at {cut}");
        assert_eq!(
            std::fs::metadata(&seg).expect("stat").len(),
            whole * 28,
            "torn bytes are truncated"
        );
        // And the log goes on from there.
        assert_eq!(log.append(vec![b"after".to_vec()]).expect("append"), whole);
        let got = log.read(0, 100).expect("read");
        assert_eq!(got.last().expect("record").payload, b"after");
    }
}

#[test]
fn a_damaged_tail_record_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path());
        log.append(vec![b"one".to_vec(), b"two".to_vec()])
            .expect("append");
    }
    let seg = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&seg).expect("segment");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&seg, &bytes).expect("damage");
    let log = open(dir.path());
    assert_eq!(
        log.next_offset(),
        1,
        "the record with a bad checksum is not replayed"
    );
}

#[test]
fn damage_in_a_sealed_segment_is_an_error_not_a_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = small_segments(dir.path());
        for i in 0..100u32 {
            log.append(vec![vec![u8::try_from(i % 256).expect("byte"); 200]])
                .expect("append");
        }
        assert!(log.segments() > 3);
    }
    let first = dir.path().join(format!("{:020}.log", 0));
    let mut f = OpenOptions::new().write(true).open(&first).expect("open");
    f.write_all(&[0xff; 8]).expect("damage the first header");
    drop(f);
    assert!(matches!(
        FileLog::open(dir.path(), FileLogConfig::default()),
        Err(EventLogError::Corrupt { .. })
    ));
}

#[test]
fn reads_cross_segments_and_use_the_sparse_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = FileLog::open(
        dir.path(),
        FileLogConfig {
            segment_bytes: 64 << 10,
            ..FileLogConfig::default()
        },
    )
    .expect("open");
    for chunk in 0..10u32 {
        log.append(
            (0..1_000u32)
                .map(|i| (chunk * 1_000 + i).to_be_bytes().to_vec())
                .collect(),
        )
        .expect("append");
    }
    assert!(log.segments() > 1);
    for from in [0u64, 1, 1023, 1024, 1025, 5_000, 9_999] {
        let got = log.read(from, 3).expect("read");
        let want: Vec<u64> = (from..(from + 3).min(10_000)).collect();
        assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
        for r in got {
            assert_eq!(
                r.payload,
                u32::try_from(r.offset).expect("small").to_be_bytes()
            );
        }
    }
    drop(log);
    let log = FileLog::open(
        dir.path(),
        FileLogConfig {
            segment_bytes: 64 << 10,
            ..FileLogConfig::default()
        },
    )
    .expect("reopen");
    assert_eq!(
        log.read(7_777, 1).expect("read")[0].payload,
        7_777u32.to_be_bytes()
    );
}
