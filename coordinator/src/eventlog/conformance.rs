//! One suite every [`EventLog`] adapter must pass. Each test takes a factory
//! that opens the log at a path (the same path twice reopens it).

use std::sync::Arc;

use super::{EventLog, EventLogError, MAX_RECORD_BYTES};

pub fn round_trip<L: EventLog>(log: &L) {
    let first = log
        .append(vec![b"a".to_vec(), b"bc".to_vec()])
        .expect("append");
    let second = log
        .append(vec![Vec::new()])
        .expect("append an empty record");
    assert_eq!(second, first + 2);
    assert_eq!(log.next_offset(), first + 3);
    let got = log.read(first, 10).expect("read");
    let payloads: Vec<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"a"[..], b"bc", b""]);
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![first, first + 1, first + 2]
    );
    assert_eq!(log.read(first + 1, 1).expect("read").len(), 1);
    assert!(
        log.read(first + 3, 10)
            .expect("read past the end")
            .is_empty()
    );
}

pub fn refuses_oversized_records<L: EventLog>(log: &L) {
    let before = log.next_offset();
    assert!(matches!(
        log.append(vec![vec![0; MAX_RECORD_BYTES + 1]]),
        Err(EventLogError::RecordTooLarge(_))
    ));
    assert_eq!(
        log.next_offset(),
        before,
        "nothing of a refused append is stored"
    );
    log.append(vec![vec![7; MAX_RECORD_BYTES]])
        .expect("the largest record fits");
}

/// Many threads appending at once: every append gets distinct offsets, each
/// caller's records stay contiguous and in order, nothing is lost.
pub fn concurrent_appends<L: EventLog + 'static>(log: Arc<L>) {
    let start = log.next_offset();
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..50u8)
                    .map(|i| {
                        (
                            log.append(vec![vec![t, i, 0], vec![t, i, 1]])
                                .expect("append"),
                            t,
                            i,
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acks: Vec<(u64, u8, u8)> = threads
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    acks.sort_unstable();
    assert_eq!(log.next_offset(), start + 800);
    let all = log.read(start, 1000).expect("read");
    assert_eq!(all.len(), 800);
    for (offset, t, i) in acks {
        let at = usize::try_from(offset - start).expect("small");
        assert_eq!(all[at].payload, vec![t, i, 0]);
        assert_eq!(all[at + 1].payload, vec![t, i, 1]);
    }
}

/// What was acknowledged survives closing and reopening.
pub fn survives_reopen<L: EventLog>(open: impl Fn() -> L) {
    let log = open();
    let first = log
        .append((0..2_500u32).map(|i| i.to_be_bytes().to_vec()).collect())
        .expect("append");
    let end = log.next_offset();
    drop(log);
    let log = open();
    assert_eq!(log.next_offset(), end);
    let got = log.read(first + 1_500, 2_000).expect("read");
    assert_eq!(got.len(), 1_000);
    assert_eq!(got[0].payload, 1_500u32.to_be_bytes());
    assert_eq!(got[999].payload, 2_499u32.to_be_bytes());
}

/// Queued appends get their offsets when queued, in queue order, and become
/// durable (readable, counted) in that order whoever waits first.
pub fn submitted_appends_keep_their_order<L: EventLog>(log: &L) {
    let start = log.next_offset();
    let a = log
        .submit(vec![b"a0".to_vec(), b"a1".to_vec()])
        .expect("submit");
    let b = log.submit(vec![b"b0".to_vec()]).expect("submit");
    assert_eq!(
        (a.first, a.count, b.first, b.count),
        (start, 2, start + 2, 1)
    );
    assert_eq!(b.wait().expect("durable"), start + 2);
    assert_eq!(log.next_offset(), start + 3, "b is durable, so a is too");
    assert_eq!(a.wait().expect("durable"), start);
    let got: Vec<Vec<u8>> = log
        .read(start, 10)
        .expect("read")
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(got, vec![b"a0".to_vec(), b"a1".to_vec(), b"b0".to_vec()]);
    assert!(matches!(
        log.submit(vec![vec![0; MAX_RECORD_BYTES + 1]]),
        Err(EventLogError::RecordTooLarge(_))
    ));
}

/// Declares the whole suite as `#[test]`s for one adapter.
#[macro_export]
macro_rules! event_log_conformance {
    ($open:expr) => {
        #[test]
        fn conformance_round_trip() {
            let dir = tempfile::tempdir().expect("tempdir");
            $crate::eventlog::conformance::round_trip(&($open)(dir.path()));
        }
        #[test]
        fn conformance_refuses_oversized_records() {
            let dir = tempfile::tempdir().expect("tempdir");
            $crate::eventlog::conformance::refuses_oversized_records(&($open)(dir.path()));
        }
        #[test]
        fn conformance_concurrent_appends() {
            let dir = tempfile::tempdir().expect("tempdir");
            $crate::eventlog::conformance::concurrent_appends(std::sync::Arc::new(($open)(
                dir.path(),
            )));
        }
        #[test]
        fn conformance_submitted_appends_keep_their_order() {
            let dir = tempfile::tempdir().expect("tempdir");
            $crate::eventlog::conformance::submitted_appends_keep_their_order(&($open)(dir.path()));
        }
        #[test]
        fn conformance_survives_reopen() {
            let dir = tempfile::tempdir().expect("tempdir");
            $crate::eventlog::conformance::survives_reopen(|| ($open)(dir.path()));
        }
    };
}
