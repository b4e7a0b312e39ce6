//! `troop-audit`: checks a Troop ledger from the outside, trusting nothing but
//! the log's public key.
//!
//! [`verify`] fetches the signed checkpoint, every entry bundle and every hash
//! tile, recomputes the tree, parses every entry, verifies every receipt
//! signature (batched, on all cores) and replays the double-entry fold. It stops
//! at the first problem and names its index or tile.

use std::path::PathBuf;
use std::time::Duration;

use rayon::prelude::*;
use troop_ledger::fold::{FoldError, Ledger};
use troop_ledger::hash::{Hash, leaf_hash};
use troop_ledger::merkle::{self, ProofError};
use troop_ledger::note::{Checkpoint, NoteError, NoteVerifier};
use troop_ledger::receipt::{self, ReceiptError, SignedMessage};
use troop_ledger::store::CHECKPOINT_PATH;
use troop_ledger::tile::{self, TILE_WIDTH, TileHashReader, TileId, TileSource, TileTree};
use troop_schemas::{EntryError, Event};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read {path}: {reason}")]
    Fetch { path: String, reason: String },
    #[error("checkpoint: {0}")]
    Checkpoint(NoteError),
    #[error("old checkpoint (--since): {0}")]
    OldCheckpoint(NoteError),
    #[error("{path}: {reason}")]
    Tile { path: String, reason: String },
    #[error("entry {index}: malformed: {source}")]
    Entry { index: u64, source: EntryError },
    #[error("entry {index}: receipt: {source}")]
    Receipt { index: u64, source: ReceiptError },
    #[error("entry {index}: {source}")]
    Fold { index: u64, source: FoldError },
    #[error(
        "tree root {computed} recomputed from the entries does not match the checkpoint's {signed}"
    )]
    RootMismatch { computed: Hash, signed: Hash },
    #[error("the log is not an extension of the old checkpoint: {0}")]
    NotAnExtension(String),
    #[error("invariant violated after replay: {0}")]
    Invariant(String),
}

/// Where the log is: a directory, or an http(s) URL prefix.
#[derive(Debug)]
pub enum Source {
    Dir(troop_ledger::store::DirStore),
    Http(HttpSource),
}

impl Source {
    pub fn open(base: &str) -> Result<Self, AuditError> {
        if base.starts_with("http://") || base.starts_with("https://") {
            Ok(Self::Http(HttpSource::new(base)))
        } else {
            let path = PathBuf::from(base);
            if !path.join(CHECKPOINT_PATH).is_file() {
                return Err(AuditError::Fetch {
                    path: base.to_owned(),
                    reason: "no checkpoint file in this directory".into(),
                });
            }
            troop_ledger::store::DirStore::open(path)
                .map(Self::Dir)
                .map_err(|e| AuditError::Fetch {
                    path: base.to_owned(),
                    reason: e.to_string(),
                })
        }
    }
}

impl TileSource for Source {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        match self {
            Source::Dir(d) => d.read(path),
            Source::Http(h) => h.read(path),
        }
    }
}

/// A bundle of 256 maximal entries, plus headroom; nothing we fetch is larger.
const MAX_FETCH_BYTES: u64 = 256 * 65_537 + 4096;

#[derive(Debug)]
pub struct HttpSource {
    base: String,
    agent: ureq::Agent,
}

impl HttpSource {
    pub fn new(base: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            agent,
        }
    }
}

impl TileSource for HttpSource {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        use std::io::Read as _;
        let url = format!("{}/{path}", self.base);
        match self.agent.get(&url).call() {
            Ok(resp) => {
                let mut body = Vec::new();
                resp.into_reader()
                    .take(MAX_FETCH_BYTES + 1)
                    .read_to_end(&mut body)
                    .map_err(|e| format!("{url}: {e}"))?;
                if body.len() as u64 > MAX_FETCH_BYTES {
                    return Err(format!(
                        "{url}: response larger than {MAX_FETCH_BYTES} bytes"
                    ));
                }
                Ok(Some(body))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }
}

fn fetch(source: &(impl TileSource + ?Sized), path: &str) -> Result<Vec<u8>, AuditError> {
    source
        .read(path)
        .map_err(|reason| AuditError::Fetch {
            path: path.to_owned(),
            reason,
        })?
        .ok_or_else(|| AuditError::Fetch {
            path: path.to_owned(),
            reason: "not found".into(),
        })
}

/// Reads and verifies the signed checkpoint at the source.
pub fn read_checkpoint(
    source: &(impl TileSource + ?Sized),
    key: &NoteVerifier,
) -> Result<(String, Checkpoint), AuditError> {
    let bytes = fetch(source, CHECKPOINT_PATH)?;
    let note = String::from_utf8(bytes)
        .map_err(|_| AuditError::Checkpoint(NoteError::Malformed("not UTF-8")))?;
    let cp = Checkpoint::open(&note, key).map_err(AuditError::Checkpoint)?;
    Ok((note, cp))
}

#[derive(Debug)]
pub struct Report {
    pub checkpoint: Checkpoint,
    pub entries: u64,
    pub receipts: u64,
    pub signatures: u64,
    pub ledger: Ledger,
    /// The old checkpoint `--since` proved to be a prefix, if one was given.
    pub since_size: Option<u64>,
}

/// Bundles checked in parallel per step: enough work per core to hide the
/// sequential fold, bounded so memory stays at a few tens of MB.
const BUNDLES_PER_STEP: u64 = 128;

struct Bundle {
    leaves: Vec<Hash>,
    events: Vec<Event>,
    receipts: u64,
    /// Receipt signatures, verified later in large batches, with the index of
    /// the entry each belongs to.
    sigs: Vec<SignedMessage>,
    sig_index: Vec<u64>,
}

/// Checks one entry bundle and its level-0 hash tile, parses its entries and
/// collects its receipts' signatures. Independent of every other bundle.
fn check_bundle(
    source: &(impl TileSource + ?Sized),
    t: u64,
    size: u64,
) -> Result<Bundle, AuditError> {
    let bundle_id = TileId::for_size(None, t, size).expect("t < bundle count");
    let bytes = fetch(source, &bundle_id.path())?;
    let entries = tile::decode_bundle(&bytes, usize::from(bundle_id.width)).map_err(|e| {
        AuditError::Tile {
            path: bundle_id.path(),
            reason: e.to_string(),
        }
    })?;
    let first = t * TILE_WIDTH;
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();

    let tile_id = TileId::for_size(Some(0), t, size).expect("same shape as the bundle");
    let tile_bytes = fetch(source, &tile_id.path())?;
    let stored = tile::decode_hashes(&tile_bytes, usize::from(tile_id.width)).ok_or_else(|| {
        AuditError::Tile {
            path: tile_id.path(),
            reason: format!("{} bytes is not {} hashes", tile_bytes.len(), tile_id.width),
        }
    })?;
    if let Some(i) = (0..leaves.len()).find(|&i| leaves[i] != stored[i]) {
        return Err(AuditError::Tile {
            path: tile_id.path(),
            reason: format!(
                "hash of entry {} does not match the entry in {}",
                first + i as u64,
                bundle_id.path()
            ),
        });
    }

    let mut events = Vec::with_capacity(entries.len());
    let mut sigs: Vec<SignedMessage> = Vec::new();
    let mut sig_index: Vec<u64> = Vec::new();
    let mut receipts = 0;
    let mut keys = receipt::KeyCache::default();
    for (i, entry) in entries.iter().enumerate() {
        let index = first + i as u64;
        let (event, members) = troop_schemas::decode_entry_spans(entry)
            .map_err(|source| AuditError::Entry { index, source })?;
        if let Some(pair) = receipt::entry_receipt_signatures(entry, &members, &event, &mut keys)
            .map_err(|source| AuditError::Receipt { index, source })?
        {
            receipts += 1;
            sig_index.extend([index, index]);
            sigs.extend(pair);
        }
        events.push(event);
    }
    Ok(Bundle {
        leaves,
        events,
        receipts,
        sigs,
        sig_index,
    })
}

/// The sequential half of the audit: the tree's upper levels and the fold.
struct Replay<'a> {
    tree: TileTree,
    ledger: Ledger,
    old: Option<&'a Checkpoint>,
    receipts: u64,
    signatures: u64,
}

impl Replay<'_> {
    fn step(
        &mut self,
        source: &(impl TileSource + ?Sized),
        step: u64,
        bundles: Vec<Bundle>,
    ) -> Result<(), AuditError> {
        for (t, bundle) in (step..).zip(bundles) {
            for (i, (leaf, event)) in bundle.leaves.iter().zip(&bundle.events).enumerate() {
                let index = t * TILE_WIDTH + i as u64;
                let mut upper = Vec::new();
                self.tree.push(*leaf, |id, hashes| {
                    // Level-0 tiles were compared in parallel with their bundles.
                    if id.level != Some(0) {
                        upper.push((id, hashes.to_vec()));
                    }
                });
                for (id, hashes) in upper {
                    check_tile(source, id, &hashes)?;
                }
                self.ledger
                    .apply(event)
                    .map_err(|source| AuditError::Fold { index, source })?;
                if let Some(old) = self.old
                    && self.tree.size() == old.size
                    && self.tree.root() != old.root
                {
                    return Err(AuditError::NotAnExtension(format!(
                        "the first {} entries hash to {}, the old checkpoint says {}",
                        old.size,
                        self.tree.root(),
                        old.root
                    )));
                }
            }
            self.receipts += bundle.receipts;
            self.signatures += bundle.sigs.len() as u64;
        }
        Ok(())
    }
}

/// Verifies every receipt signature of a step, in large batches on all cores;
/// names the entry of the first bad one.
fn verify_signatures(bundles: &[Bundle]) -> Result<(), AuditError> {
    let (sigs, index): (Vec<&SignedMessage>, Vec<u64>) = bundles
        .iter()
        .flat_map(|b| b.sigs.iter().zip(b.sig_index.iter().copied()))
        .unzip();
    receipt::verify_all(&sigs).map_err(|(pos, source)| AuditError::Receipt {
        index: index[pos],
        source,
    })
}

/// Compares a hash tile the tree built with the one published.
fn check_tile(
    source: &(impl TileSource + ?Sized),
    id: TileId,
    computed: &[Hash],
) -> Result<(), AuditError> {
    let bytes = fetch(source, &id.path())?;
    if bytes != tile::encode_hashes(computed) {
        return Err(AuditError::Tile {
            path: id.path(),
            reason: "does not match the hashes recomputed from the entries".into(),
        });
    }
    Ok(())
}

/// Verifies the whole log. `since` is an older signed checkpoint note that the
/// current log must extend. `progress` is told how many entries were checked.
pub fn verify(
    source: &(impl TileSource + ?Sized),
    key: &NoteVerifier,
    since: Option<&str>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, AuditError> {
    verify_across_rotation(source, key, since.map(|note| (note, key)), progress)
}

/// [`verify`], where the older checkpoint was signed by the key the log used
/// before its key was rotated (`since`: the note and that key). The tree is
/// the same; only who vouches for it changed, so the proof that the current
/// log extends the old checkpoint is what ties the two keys' statements.
pub fn verify_across_rotation(
    source: &(impl TileSource + ?Sized),
    key: &NoteVerifier,
    since: Option<(&str, &NoteVerifier)>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, AuditError> {
    let (_, checkpoint) = read_checkpoint(source, key)?;
    let size = checkpoint.size;
    let old = since
        .map(|(note, key)| Checkpoint::open(note, key).map_err(AuditError::OldCheckpoint))
        .transpose()?;
    if let Some(old) = &old
        && old.size > size
    {
        return Err(AuditError::NotAnExtension(format!(
            "old size {} is larger than current size {size}",
            old.size
        )));
    }

    let bundles = size.div_ceil(TILE_WIDTH);
    let mut replay = Replay {
        tree: TileTree::default(),
        ledger: Ledger::new(),
        old: old.as_ref(),
        receipts: 0,
        signatures: 0,
    };
    let check_step = |step: u64| -> Result<Vec<Bundle>, AuditError> {
        let end = (step + BUNDLES_PER_STEP).min(bundles);
        let checked: Vec<Result<Bundle, AuditError>> = (step..end)
            .into_par_iter()
            .map(|t| check_bundle(source, t, size))
            .collect();
        // In order, so the first bad bundle is the one named.
        let checked: Vec<Bundle> = checked.into_iter().collect::<Result<_, _>>()?;
        verify_signatures(&checked)?;
        Ok(checked)
    };
    // Pipelined: the sequential replay of one step runs while the next step's
    // bundles are checked on the other cores.
    let mut step = 0;
    let mut current = (bundles > 0).then(|| check_step(0));
    while let Some(checked) = current.take() {
        let checked = checked?;
        let next_step = step + BUNDLES_PER_STEP;
        let (replayed, next) = rayon::join(
            || replay.step(source, step, checked),
            || (next_step < bundles).then(|| check_step(next_step)),
        );
        replayed?;
        progress(next_step.saturating_mul(TILE_WIDTH).min(size));
        current = next;
        step = next_step;
    }
    let Replay {
        tree,
        ledger,
        receipts,
        signatures,
        ..
    } = replay;
    for (id, hashes) in tree.partial_tiles() {
        if id.level != Some(0) {
            check_tile(source, id, hashes)?;
        }
    }
    let computed = tree.root();
    if computed != checkpoint.root {
        return Err(AuditError::RootMismatch {
            computed,
            signed: checkpoint.root,
        });
    }
    if let Some(old) = &old {
        // Also check the log's own consistency proof, as a witness would.
        let reader = TileHashReader::new(source, size);
        let proof = merkle::consistency_proof(&reader, old.size, size)
            .map_err(|e| AuditError::NotAnExtension(e.to_string()))?;
        merkle::verify_consistency(old.size, &old.root, size, &checkpoint.root, &proof)
            .map_err(|e: ProofError| AuditError::NotAnExtension(e.to_string()))?;
        if old.size == 0 && old.root != troop_ledger::hash::empty_root() {
            return Err(AuditError::NotAnExtension(
                "old checkpoint of size 0 has a non-empty root".into(),
            ));
        }
    }
    ledger.check_invariants().map_err(AuditError::Invariant)?;
    Ok(Report {
        checkpoint,
        entries: size,
        receipts,
        signatures,
        ledger,
        since_size: old.map(|o| o.size),
    })
}
