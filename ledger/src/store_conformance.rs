//! One suite every [`LogStore`] adapter must pass: the embedded directory, the
//! in-memory store and the cluster's Postgres store. Each test gets a fresh
//! [`Place`]; opening the same place twice is a restart.

use ed25519_dalek::SigningKey;

use crate::hash::leaf_hash;
use crate::merkle;
use crate::note::{Checkpoint, NoteSigner};
use crate::store::{CHECKPOINT_PATH, LogStore, StoreError};
use crate::tile::{self, TileHashReader, TileId, TileSource as _};
use crate::writer::LogWriter;

/// Where one store lives.
pub trait Place {
    type Store: LogStore;
    /// Opens the store; every call opens the same one anew (a restart).
    fn open(&self) -> Self::Store;
    /// The caller's durable copy of entry `index`, made before the writer is
    /// given it (the sequencer commits each entry to `ledger_entries` first).
    /// A store that builds entry bundles from those copies instead of storing
    /// them needs it; the others ignore it.
    fn sequenced(&self, _index: u64, _entry: &[u8]) {}
}

/// Appends entries `range` to `writer`, each made durable at `place` first.
fn append<P: Place>(place: &P, writer: &mut LogWriter<P::Store>, range: std::ops::Range<u64>) {
    for i in range {
        place.sequenced(i, &entry(i));
        writer.append(entry(i)).expect("append");
    }
}

fn signer() -> NoteSigner {
    NoteSigner::new("conformance.example/log", SigningKey::from_bytes(&[7; 32])).expect("signer")
}

fn entry(i: u64) -> Vec<u8> {
    format!("{{\"entry\":{i}}}").into_bytes()
}

fn note_of_size(size: u64) -> Vec<u8> {
    let body = Checkpoint {
        origin: "conformance.example/log".into(),
        size,
        root: crate::hash::empty_root(),
        extensions: vec![],
    };
    signer().sign(&body.to_text()).expect("sign").into_bytes()
}

pub fn files_round_trip<P: Place>(place: &P) {
    let store = place.open();
    let path = TileId::hashes(0, 0, 256).path();
    assert_eq!(
        store.read(&path).expect("read"),
        None,
        "a fresh store is empty"
    );
    store.write(&path, b"first").expect("write");
    assert_eq!(
        store.read(&path).expect("read").as_deref(),
        Some(&b"first"[..]),
        "a write is readable before sync (the writer checks what it wrote)"
    );
    store.write(&path, b"second").expect("overwrite");
    store.sync().expect("sync");
    drop(store);
    let store = place.open();
    assert_eq!(
        store.read(&path).expect("read").as_deref(),
        Some(&b"second"[..]),
        "synced writes survive a restart"
    );
}

pub fn refuses_paths_outside_the_layout<P: Place>(place: &P) {
    let store = place.open();
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "tile/../x",
        "tile//0",
        "a b",
        "tile/0/\u{e9}",
    ] {
        assert!(
            matches!(store.write(bad, b"x"), Err(StoreError::BadPath(_))),
            "{bad:?} accepted"
        );
    }
}

pub fn checkpoint_only_moves_forward<P: Place>(place: &P) {
    let store = place.open();
    store.publish_checkpoint(&note_of_size(5)).expect("first");
    assert!(matches!(
        store.publish_checkpoint(&note_of_size(3)),
        Err(StoreError::Stale {
            stored: 5,
            offered: 3
        })
    ));
    store
        .publish_checkpoint(&note_of_size(5))
        .expect("the same size again (a second writer that caught up)");
    assert!(matches!(
        store.publish_checkpoint(b"not a note"),
        Err(StoreError::BadCheckpoint(_))
    ));
    store.publish_checkpoint(&note_of_size(7)).expect("forward");
    drop(store);
    let store = place.open();
    assert_eq!(
        store.read(CHECKPOINT_PATH).expect("read"),
        Some(note_of_size(7)),
        "the newest checkpoint survives a restart"
    );
}

/// The writer over the store: crosses full tiles and bundles, resumes from
/// what the store holds, and what it published proves inclusion and
/// consistency from the stored tiles alone.
pub fn writer_resumes_and_proves<P: Place>(place: &P) {
    const FIRST: u64 = 600;
    const MORE: u64 = 77;
    let mut writer = LogWriter::open(place.open(), signer()).expect("open");
    append(place, &mut writer, 0..FIRST);
    let first_root = writer.publish().expect("publish").root;
    drop(writer);

    let mut writer = LogWriter::open(place.open(), signer()).expect("reopen");
    assert_eq!(writer.size(), FIRST, "resumed at the published size");
    assert_eq!(writer.published().root, first_root);
    append(place, &mut writer, FIRST..FIRST + MORE);
    let root = writer.publish().expect("publish").root;
    drop(writer);

    let store = place.open();
    let size = FIRST + MORE;
    let note = store
        .read(CHECKPOINT_PATH)
        .expect("read")
        .expect("checkpoint");
    let published = Checkpoint::open(
        std::str::from_utf8(&note).expect("utf-8"),
        &signer().verifier(),
    )
    .expect("signed");
    assert_eq!((published.size, published.root), (size, root));
    let reader = TileHashReader::new(&store, size);
    for index in [0, 255, 256, 511, 599, size - 1] {
        let proof = merkle::inclusion_proof(&reader, index, size).expect("proof");
        merkle::verify_inclusion(&leaf_hash(&entry(index)), index, size, &proof, &root)
            .expect("inclusion verifies");
    }
    let proof = merkle::consistency_proof(&reader, FIRST, size).expect("consistency");
    merkle::verify_consistency(FIRST, &first_root, size, &root, &proof).expect("consistent");
    let bundle = store
        .read(&TileId::entries(1, 256).path())
        .expect("read")
        .expect("full bundle");
    let entries = tile::decode_bundle(&bundle, 256).expect("bundle");
    assert_eq!(entries[0], entry(256).as_slice());
    let partial = TileId::for_size(None, size / 256, size).expect("a partial bundle");
    let bundle = store
        .read(&partial.path())
        .expect("read")
        .expect("the partial bundle of the published size");
    let entries = tile::decode_bundle(&bundle, usize::from(partial.width)).expect("bundle");
    assert_eq!(entries.last().copied(), Some(entry(size - 1).as_slice()));
}

/// Files written without a checkpoint (a crash before publishing) do not move
/// the log: the writer reopens at the last checkpoint and the caller appends
/// again from its own durable copy of the entries.
pub fn unpublished_writes_do_not_move_the_log<P: Place>(place: &P) {
    let mut writer = LogWriter::open(place.open(), signer()).expect("open");
    append(place, &mut writer, 0..10);
    writer.publish().expect("publish");
    append(place, &mut writer, 10..300);
    writer
        .integrate()
        .expect("integrate: writes a full tile, no checkpoint");
    drop(writer);
    let mut writer = LogWriter::open(place.open(), signer()).expect("reopen");
    assert_eq!(writer.size(), 10);
    append(place, &mut writer, 10..300);
    writer
        .publish()
        .expect("publish over the unpublished files");
    assert_eq!(writer.published().size, 300);
}

/// Declares the whole suite as `#[test]`s; `$place` makes a fresh [`Place`].
#[macro_export]
macro_rules! log_store_conformance {
    ($place:expr) => {
        #[test]
        fn log_store_files_round_trip() {
            $crate::store_conformance::files_round_trip(&$place);
        }
        #[test]
        fn log_store_refuses_paths_outside_the_layout() {
            $crate::store_conformance::refuses_paths_outside_the_layout(&$place);
        }
        #[test]
        fn log_store_checkpoint_only_moves_forward() {
            $crate::store_conformance::checkpoint_only_moves_forward(&$place);
        }
        #[test]
        fn log_store_writer_resumes_and_proves() {
            $crate::store_conformance::writer_resumes_and_proves(&$place);
        }
        #[test]
        fn log_store_unpublished_writes_do_not_move_the_log() {
            $crate::store_conformance::unpublished_writes_do_not_move_the_log(&$place);
        }
    };
}
