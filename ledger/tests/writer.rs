//! The log writer: resume after a crash at any point, partial tiles for every
//! published size, refusal to sign a tree that does not extend the last one.

use std::sync::atomic::{AtomicUsize, Ordering};

use ed25519_dalek::SigningKey;
use troop_ledger::merkle::{consistency_proof, tree_hash, verify_consistency};
use troop_ledger::note::NoteSigner;
use troop_ledger::store::{DirStore, LogStore, MemStore, StoreError};
use troop_ledger::tile::{self, TileHashReader, TileSource, TileTree};
use troop_ledger::writer::{LogWriter, WriterError};

fn signer() -> NoteSigner {
    NoteSigner::new("writer.example/log", SigningKey::from_bytes(&[31; 32])).expect("signer")
}

fn entry(i: u64) -> Vec<u8> {
    format!("{{\"i\":{i}}}").into_bytes()
}

/// A store whose `fail_at`-th mutating call (write, sync or checkpoint) fails,
/// and every one after it: the process "crashes" there.
struct Crashing<'a> {
    inner: &'a DirStore,
    calls: AtomicUsize,
    fail_at: usize,
}

impl Crashing<'_> {
    fn tick(&self) -> Result<(), StoreError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_at {
            Err(StoreError::Io {
                path: "crash".into(),
                source: std::io::Error::other("injected crash"),
            })
        } else {
            Ok(())
        }
    }
}

impl TileSource for Crashing<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        self.inner.read(path)
    }
}

impl LogStore for Crashing<'_> {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.tick()?;
        self.inner.write(path, bytes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.tick()?;
        self.inner.sync()
    }
    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        self.tick()?;
        self.inner.publish_checkpoint(note)
    }
}

fn reference_root(n: u64) -> troop_ledger::Hash {
    let mut w = LogWriter::open(MemStore::default(), signer()).expect("open");
    for i in 0..n {
        w.append(entry(i)).expect("append");
    }
    w.publish().expect("publish").root
}

#[test]
fn a_crash_at_any_write_leaves_a_resumable_log() {
    const BASE: u64 = 700;
    const MORE: u64 = 600;
    let want = reference_root(BASE + MORE);
    let mut fail_at = 0;
    loop {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("store");
        let mut w = LogWriter::open(&store, signer()).expect("open");
        for i in 0..BASE {
            w.append(entry(i)).expect("append");
        }
        let base = w.publish().expect("publish").clone();
        drop(w);

        let crashing = Crashing {
            inner: &store,
            calls: AtomicUsize::new(0),
            fail_at,
        };
        let mut w = LogWriter::open(&crashing, signer()).expect("reopen before the crash");
        for i in BASE..BASE + MORE {
            w.append(entry(i)).expect("append is in memory");
        }
        let crashed = w.publish().is_err();
        drop(w);

        // Restart: the log opens at the last checkpoint that made it to disk.
        let mut w = LogWriter::open(&store, signer()).expect("a crashed log reopens");
        let published = w.published().clone();
        assert!(
            published.size == BASE || (!crashed && published.size == BASE + MORE),
            "size {}",
            published.size
        );
        if published.size == BASE {
            assert_eq!(published.root, base.root);
        }
        // The caller re-feeds what was not published, from its own event log.
        for i in w.size()..BASE + MORE {
            w.append(entry(i)).expect("append");
        }
        let done = w.publish().expect("publish after restart").clone();
        assert_eq!(done.root, want, "crash at mutation {fail_at}");
        let r = TileHashReader::new(&store, done.size);
        let proof = consistency_proof(&r, base.size, done.size).expect("proof");
        verify_consistency(base.size, &base.root, done.size, &done.root, &proof)
            .expect("extends the base");
        if !crashed {
            break;
        }
        fail_at += 1;
    }
    assert!(
        fail_at > 5,
        "the crash points covered only {fail_at} mutations"
    );
}

#[test]
fn every_published_size_keeps_its_partial_tiles() {
    let store = MemStore::default();
    let mut w = LogWriter::open(&store, signer()).expect("open");
    let mut sizes = Vec::new();
    for i in 0..3_000u64 {
        w.append(entry(i)).expect("append");
        if i % 311 == 0 {
            let cp = w.publish().expect("publish").clone();
            sizes.push(cp);
        }
    }
    for cp in sizes {
        let tree = TileTree::from_partials(cp.size, |id| {
            tile::decode_hashes(&store.read(&id.path()).ok()??, usize::from(id.width))
        })
        .unwrap_or_else(|| panic!("partial tiles of size {} are gone", cp.size));
        assert_eq!(tree.root(), cp.root);
        let r = TileHashReader::new(&store, cp.size);
        assert_eq!(tree_hash(&r, cp.size).expect("root from tiles"), cp.root);
    }
}

/// A store that, once armed, damages every level-1 tile it is asked to write,
/// as a failing disk or a buggy storage layer would.
#[derive(Default)]
struct Damaging {
    inner: MemStore,
    armed: std::sync::atomic::AtomicBool,
}

impl TileSource for Damaging {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        self.inner.read(path)
    }
}

impl LogStore for Damaging {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut bytes = bytes.to_vec();
        if self.armed.load(Ordering::SeqCst) && path.starts_with("tile/1/") {
            bytes[0] ^= 0xff;
        }
        self.inner.write(path, &bytes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync()
    }
    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        self.inner.publish_checkpoint(note)
    }
}

#[test]
fn refuses_to_sign_a_tree_that_does_not_extend_the_last() {
    let store = Damaging::default();
    let mut w = LogWriter::open(&store, signer()).expect("open");
    for i in 0..600 {
        w.append(entry(i)).expect("append");
    }
    let before = w.publish().expect("publish").clone();
    store.armed.store(true, Ordering::SeqCst);
    for i in 600..700 {
        w.append(entry(i)).expect("append");
    }
    assert!(matches!(w.publish(), Err(WriterError::Inconsistent(_))));
    assert_eq!(w.published(), &before, "no new checkpoint was signed");
    let note =
        String::from_utf8(store.read("checkpoint").expect("read").expect("exists")).expect("utf8");
    assert!(
        note.contains("\n600\n"),
        "the stored checkpoint is still the old one"
    );
}

#[test]
fn oversized_entries_and_foreign_checkpoints_are_refused() {
    let store = MemStore::default();
    let mut w = LogWriter::open(&store, signer()).expect("open");
    assert!(matches!(
        w.append(vec![b'x'; 65_536]),
        Err(WriterError::EntryTooLarge(65_536))
    ));
    w.append(vec![b'x'; 65_535]).expect("the maximum fits");
    w.publish().expect("publish");
    drop(w);
    let other =
        NoteSigner::new("writer.example/log", SigningKey::from_bytes(&[32; 32])).expect("signer");
    assert!(matches!(
        LogWriter::open(&store, other),
        Err(WriterError::Checkpoint(_))
    ));
}

#[test]
fn a_rotated_key_takes_over_the_same_tree() {
    let store = MemStore::default();
    let mut w = LogWriter::open(&store, signer()).expect("open");
    for i in 0..300 {
        w.append(entry(i)).expect("append");
    }
    let old = w.publish().expect("publish").clone();
    let old_note =
        String::from_utf8(store.read("checkpoint").expect("read").expect("stored")).expect("utf-8");
    drop(w);
    let new =
        NoteSigner::new("writer.example/log", SigningKey::from_bytes(&[33; 32])).expect("signer");
    let renamed =
        NoteSigner::new("writer.example/other", SigningKey::from_bytes(&[33; 32])).expect("signer");
    // The name is the origin line: a rotation keeps it.
    assert!(matches!(
        LogWriter::open_rotated(&store, renamed, Some(&signer().verifier())),
        Err(WriterError::Corrupt(_))
    ));
    // Not named as the previous key: refused as before.
    assert!(matches!(
        LogWriter::open_rotated(&store, new.clone(), None),
        Err(WriterError::Checkpoint(_))
    ));
    let mut w = LogWriter::open_rotated(&store, new.clone(), Some(&signer().verifier()))
        .expect("the old key's checkpoint is accepted");
    // The same tree, now vouched for by the new key alone.
    let resigned =
        String::from_utf8(store.read("checkpoint").expect("read").expect("stored")).expect("utf-8");
    let cp = troop_ledger::note::Checkpoint::open(&resigned, &new.verifier()).expect("new key");
    assert_eq!((cp.size, cp.root), (old.size, old.root));
    assert!(troop_ledger::note::Checkpoint::open(&resigned, &signer().verifier()).is_err());
    assert!(troop_ledger::note::Checkpoint::open(&old_note, &signer().verifier()).is_ok());
    w.append(entry(300)).expect("append");
    assert_eq!(w.publish().expect("publish").size, 301);
    drop(w);
    // Opened again with the rotation still configured: the new key's own
    // checkpoint is taken as it is.
    LogWriter::open_rotated(&store, new, Some(&signer().verifier())).expect("reopen");
}
