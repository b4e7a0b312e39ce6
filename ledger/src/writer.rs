//! The log writer: sequencing (append, in memory, durable elsewhere — the
//! coordinator's event log) kept apart from integration (tiles, bundles) and
//! publication (a signed checkpoint, the commit point).

use crate::hash::{Hash, leaf_hash};
use crate::merkle::{self, ProofError};
use crate::note::{Checkpoint, NoteError, NoteSigner, NoteVerifier};
use crate::store::{CHECKPOINT_PATH, LogStore, StoreError};
use crate::tile::{self, TILE_WIDTH, TileHashReader, TileId, TileTree};
use troop_schemas::MAX_ENTRY_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("entry of {0} bytes is over the {MAX_ENTRY_BYTES}-byte limit")]
    EntryTooLarge(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored checkpoint: {0}")]
    Checkpoint(#[from] NoteError),
    #[error("reading the stored log: {0}")]
    Corrupt(String),
    #[error("new checkpoint is not consistent with the previous one: {0}")]
    Inconsistent(ProofError),
}

/// Appends entries and publishes signed checkpoints over a [`LogStore`].
pub struct LogWriter<S: LogStore> {
    store: S,
    signer: NoteSigner,
    tree: TileTree,
    /// Encoded entries after the last full bundle.
    bundle: Vec<u8>,
    bundle_count: usize,
    /// Appended, not yet integrated.
    sequenced: Vec<Vec<u8>>,
    published: Checkpoint,
}

impl<S: LogStore> std::fmt::Debug for LogWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LogWriter(size={}, published={})",
            self.tree.size(),
            self.published.size
        )
    }
}

impl<S: LogStore> LogWriter<S> {
    /// Opens the log in `store`, resuming from its last published checkpoint,
    /// or starts a new one (publishing the empty tree) if there is none.
    ///
    /// Entries appended after that checkpoint were not published and are gone:
    /// the caller re-appends them from its own durable event log, from index
    /// [`LogWriter::size`] on.
    pub fn open(store: S, signer: NoteSigner) -> Result<Self, WriterError> {
        Self::open_rotated(store, signer, None)
    }

    /// [`LogWriter::open`] for a log whose key was rotated: the stored
    /// checkpoint may also be signed by `previous`, the key before. Then the
    /// same tree is published again at once under `signer`, so that from
    /// here on the store holds the new key's statement only (auditors tie the
    /// two with a consistency proof from the old key's last checkpoint). The
    /// log's name stays: it is the checkpoints' origin line.
    pub fn open_rotated(
        store: S,
        signer: NoteSigner,
        previous: Option<&NoteVerifier>,
    ) -> Result<Self, WriterError> {
        let verifier = signer.verifier();
        let existing = store.read(CHECKPOINT_PATH).map_err(WriterError::Corrupt)?;
        let Some(note) = existing else {
            let mut w = Self {
                store,
                signer,
                tree: TileTree::default(),
                bundle: Vec::new(),
                bundle_count: 0,
                sequenced: Vec::new(),
                published: Checkpoint {
                    origin: String::new(),
                    size: 0,
                    root: crate::hash::empty_root(),
                    extensions: vec![],
                },
            };
            w.published.origin = w.signer.name().to_owned();
            let note = w.signer.sign(&w.published.to_text())?;
            w.store.publish_checkpoint(note.as_bytes())?;
            return Ok(w);
        };
        let note = String::from_utf8(note)
            .map_err(|_| WriterError::Corrupt("checkpoint is not UTF-8".into()))?;
        let (published, resign) = match (Checkpoint::open(&note, &verifier), previous) {
            (Ok(c), _) => (c, false),
            (Err(e), None) => return Err(e.into()),
            (Err(e), Some(previous)) => match Checkpoint::open(&note, previous) {
                Ok(c) => (c, true),
                // Neither key: report it against the current one.
                Err(_) => return Err(e.into()),
            },
        };
        if resign && published.origin != signer.name() {
            return Err(WriterError::Corrupt(format!(
                "the log is named {:?}; a new key must keep the name, not {:?}",
                published.origin,
                signer.name()
            )));
        }
        let size = published.size;
        let tree = TileTree::from_partials(size, |id| {
            let bytes = store.read(&id.path()).ok()??;
            tile::decode_hashes(&bytes, usize::from(id.width))
        })
        .ok_or_else(|| {
            WriterError::Corrupt(format!(
                "partial tiles of size {size} are missing or damaged"
            ))
        })?;
        if tree.root() != published.root {
            return Err(WriterError::Corrupt(
                "tiles do not match the checkpoint's root".into(),
            ));
        }
        let bundle_count = usize::try_from(size % TILE_WIDTH).expect("< 256");
        let bundle = if bundle_count == 0 {
            Vec::new()
        } else {
            let id = TileId::entries(
                size / TILE_WIDTH,
                u16::try_from(bundle_count).expect("< 256"),
            );
            let bytes = store
                .read(&id.path())
                .map_err(WriterError::Corrupt)?
                .ok_or_else(|| WriterError::Corrupt(format!("{} is missing", id.path())))?;
            tile::decode_bundle(&bytes, bundle_count)
                .map_err(|e| WriterError::Corrupt(e.to_string()))?;
            bytes
        };
        if resign {
            let note = signer.sign(&published.to_text())?;
            store.publish_checkpoint(note.as_bytes())?;
        }
        Ok(Self {
            store,
            signer,
            tree,
            bundle,
            bundle_count,
            sequenced: Vec::new(),
            published,
        })
    }

    /// Entries integrated into the tree (not necessarily published).
    pub fn integrated_size(&self) -> u64 {
        self.tree.size()
    }

    /// Entries appended so far: the index the next entry gets.
    pub fn size(&self) -> u64 {
        self.tree.size() + self.sequenced.len() as u64
    }

    pub fn published(&self) -> &Checkpoint {
        &self.published
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn signer(&self) -> &NoteSigner {
        &self.signer
    }

    /// Sequences one entry; returns its index.
    pub fn append(&mut self, entry: Vec<u8>) -> Result<u64, WriterError> {
        if entry.len() > MAX_ENTRY_BYTES {
            return Err(WriterError::EntryTooLarge(entry.len()));
        }
        self.sequenced.push(entry);
        Ok(self.size() - 1)
    }

    /// Hashes sequenced entries into the tree and writes every tile and bundle
    /// they complete. Cheap to call often; [`LogWriter::publish`] calls it.
    pub fn integrate(&mut self) -> Result<(), WriterError> {
        let mut full_tiles: Vec<(TileId, Vec<u8>)> = Vec::new();
        for entry in std::mem::take(&mut self.sequenced) {
            self.tree.push(leaf_hash(&entry), |id, hashes| {
                full_tiles.push((id, tile::encode_hashes(hashes)))
            });
            let len = u16::try_from(entry.len()).expect("checked at append");
            self.bundle.extend_from_slice(&len.to_be_bytes());
            self.bundle.extend_from_slice(&entry);
            self.bundle_count += 1;
            if self.bundle_count == 256 {
                let id = TileId::entries(self.tree.size() / TILE_WIDTH - 1, 256);
                self.store.write(&id.path(), &self.bundle)?;
                self.bundle.clear();
                self.bundle_count = 0;
            }
        }
        for (id, bytes) in full_tiles {
            self.store.write(&id.path(), &bytes)?;
        }
        Ok(())
    }

    /// Integrates, writes the partial tiles of the new size, checks the new tree
    /// extends the last published one, makes it all durable and signs a new
    /// checkpoint. A no-op when nothing was appended.
    pub fn publish(&mut self) -> Result<&Checkpoint, WriterError> {
        self.integrate()?;
        let size = self.tree.size();
        if size == self.published.size {
            return Ok(&self.published);
        }
        for (id, hashes) in self.tree.partial_tiles() {
            self.store.write(&id.path(), &tile::encode_hashes(hashes))?;
        }
        if self.bundle_count > 0 {
            let id = TileId::entries(
                size / TILE_WIDTH,
                u16::try_from(self.bundle_count).expect("< 256"),
            );
            self.store.write(&id.path(), &self.bundle)?;
        }
        let root = self.tree.root();
        self.check_consistent(size, &root)?;
        self.store.sync()?;
        let next = Checkpoint {
            origin: self.signer.name().to_owned(),
            size,
            root,
            extensions: vec![],
        };
        let note = self.signer.sign(&next.to_text())?;
        self.store.publish_checkpoint(note.as_bytes())?;
        self.published = next;
        Ok(&self.published)
    }

    /// Proves, from the stored tiles themselves, that the tree about to be
    /// signed extends the last signed one. By construction it always does; this
    /// is the assertion that keeps a bug or a damaged store from ever producing
    /// a fork with our signature on it.
    fn check_consistent(&self, size: u64, root: &Hash) -> Result<(), WriterError> {
        let old = &self.published;
        assert!(old.size <= size, "log shrank from {} to {size}", old.size);
        if old.size == 0 {
            return Ok(());
        }
        let reader = TileHashReader::new(&self.store, size);
        let proof = merkle::consistency_proof(&reader, old.size, size)
            .map_err(WriterError::Inconsistent)?;
        merkle::verify_consistency(old.size, &old.root, size, root, &proof)
            .map_err(WriterError::Inconsistent)?;
        let stored_root = merkle::tree_hash(&reader, size).map_err(WriterError::Inconsistent)?;
        if stored_root != *root {
            return Err(WriterError::Inconsistent(ProofError::RootMismatch));
        }
        Ok(())
    }
}
