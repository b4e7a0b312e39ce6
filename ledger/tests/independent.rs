//! Our log, checked by an implementation we did not write: Cloudflare's
//! `tlog_tiles` (a port of Go's sumdb/tlog) and `signed_note` crates.
//! They read our tile paths, authenticate our tiles against our signed
//! checkpoint, and produce the same proofs we do.

use std::path::Path;

use ed25519_dalek::SigningKey;
use signed_note::{Note, StandardVerifier, VerifierList};
use troop_ledger::merkle;
use troop_ledger::note::NoteSigner;
use troop_ledger::store::DirStore;
use troop_ledger::tile::TileHashReader;
use troop_ledger::writer::LogWriter;

struct DirTiles<'a>(&'a Path);

/// `tlog_tiles` 0.2 writes Go sumdb paths, which name the tile height
/// (`tile/8/L/N`, `tile/8/data/N`); C2SP tlog-tiles fixes the height at 8 and
/// drops it (`tile/L/N`, `tile/entries/N`). Otherwise the paths are the same.
fn to_c2sp(sumdb: &str) -> String {
    let rest = sumdb.strip_prefix("tile/8/").expect("height-8 sumdb path");
    match rest.strip_prefix("data/") {
        Some(n) => format!("tile/entries/{n}"),
        None => format!("tile/{rest}"),
    }
}

fn to_sumdb(c2sp: &str) -> String {
    let rest = c2sp.strip_prefix("tile/").expect("tile path");
    match rest.strip_prefix("entries/") {
        Some(n) => format!("tile/8/data/{n}"),
        None => format!("tile/8/{rest}"),
    }
}

impl tlog_tiles::TileReader for DirTiles<'_> {
    fn height(&self) -> u8 {
        8
    }

    fn read_tiles(&self, tiles: &[tlog_tiles::Tile]) -> Result<Vec<Vec<u8>>, tlog_tiles::Error> {
        // Their path for each tile, in C2SP form, must be a file we wrote.
        Ok(tiles
            .iter()
            .map(|t| {
                let path = to_c2sp(&t.path());
                std::fs::read(self.0.join(&path)).unwrap_or_else(|e| panic!("{path}: {e}"))
            })
            .collect())
    }

    fn save_tiles(&self, _tiles: &[tlog_tiles::Tile], _data: &[Vec<u8>]) {}
}

#[test]
fn tlog_tiles_and_signed_note_accept_our_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let signer = NoteSigner::new("independent.example/log", SigningKey::from_bytes(&[21; 32]))
        .expect("signer");
    let vkey = signer.verifier().to_key_string();
    let mut w = LogWriter::open(DirStore::open(dir.path()).expect("store"), signer).expect("open");
    let mut entries = Vec::new();
    let mut old = Vec::new();
    // Past 65,536 entries so that level-1 tiles exist, with checkpoints at odd sizes.
    for i in 0..70_001u64 {
        let e = format!("{{\"n\":{i}}}").into_bytes();
        w.append(e.clone()).expect("append");
        entries.push(e);
        if i % 9_973 == 0 {
            old.push(w.publish().expect("publish").clone());
        }
    }
    let ours = w.publish().expect("publish").clone();

    // The signed note verifies with their verifier built from our key string.
    let note_bytes = std::fs::read(dir.path().join("checkpoint")).expect("checkpoint");
    let verifier = StandardVerifier::new(&vkey).expect("they parse our verifier key");
    let note = Note::from_bytes(&note_bytes).expect("they parse our note");
    note.verify(&VerifierList::new(vec![Box::new(verifier)]))
        .expect("they verify our signature");
    let cp = tlog_tiles::Checkpoint::from_bytes(note.text()).expect("they parse our checkpoint");
    assert_eq!(cp.origin(), "independent.example/log");
    assert_eq!(cp.size(), ours.size);
    assert_eq!(cp.hash().0, ours.root.0);

    // Their tile reader authenticates our tiles against our root.
    let reader = DirTiles(dir.path());
    let thr = tlog_tiles::TileHashReader::new(cp.size(), *cp.hash(), &reader);
    assert_eq!(
        tlog_tiles::tree_hash(cp.size(), &thr).expect("tree hash").0,
        ours.root.0
    );

    let store = DirStore::open(dir.path()).expect("store");
    let our_reader = TileHashReader::new(&store, ours.size);
    for n in [0u64, 1, 255, 256, 65_535, 65_536, 70_000] {
        let theirs = tlog_tiles::prove_record(cp.size(), n, &thr).expect("their proof");
        let mine = merkle::inclusion_proof(&our_reader, n, ours.size).expect("our proof");
        assert_eq!(
            theirs.iter().map(|h| h.0).collect::<Vec<_>>(),
            mine.iter().map(|h| h.0).collect::<Vec<_>>()
        );
        let leaf = tlog_tiles::record_hash(&entries[usize::try_from(n).expect("small")]);
        tlog_tiles::check_record(&theirs, cp.size(), *cp.hash(), n, leaf).expect("their check");
    }
    for o in old.iter().filter(|o| o.size > 0) {
        let theirs = tlog_tiles::prove_tree(cp.size(), o.size, &thr).expect("their proof");
        let mine = merkle::consistency_proof(&our_reader, o.size, ours.size).expect("our proof");
        assert_eq!(
            theirs.iter().map(|h| h.0).collect::<Vec<_>>(),
            mine.iter().map(|h| h.0).collect::<Vec<_>>()
        );
        tlog_tiles::check_tree(
            &theirs,
            cp.size(),
            *cp.hash(),
            o.size,
            tlog_tiles::Hash(o.root.0),
        )
        .expect("their check");
    }

    // Every file we wrote is a path they recognise, with the width the path says.
    let mut files = 0;
    for e in walk(&dir.path().join("tile")) {
        let rel = e
            .strip_prefix(dir.path())
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let tile = tlog_tiles::Tile::from_path(&to_sumdb(&rel))
            .unwrap_or_else(|_| panic!("they reject our path {rel}"));
        assert_eq!(to_c2sp(&tile.path()), rel, "round trip of {rel}");
        let len = std::fs::metadata(&e).expect("stat").len();
        if !tile.is_data() {
            assert_eq!(len, u64::from(tile.width()) * 32, "{rel}");
        }
        files += 1;
    }
    assert!(files > 550, "only {files} tiles");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
        {
            out.push(p);
        }
    }
    out
}
