//! Where the log's files live. The writer needs only [`LogStore`]; the
//! directory store is what the embedded coordinator publishes at `/ledger/`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::tile::TileSource;

pub const CHECKPOINT_PATH: &str = "checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("path {0:?} is not a log path")]
    BadPath(String),
    /// A writer that fell behind (a sequencer that lost its lease) offered a
    /// checkpoint of a smaller tree than the stored one: published
    /// checkpoints only move forward.
    #[error("the stored checkpoint covers {stored} entries; refusing one of {offered}")]
    Stale { stored: u64, offered: u64 },
    #[error("checkpoint note: {0}")]
    BadCheckpoint(String),
    /// A store that is not a filesystem (a database) failed.
    #[error("{0}")]
    Backend(String),
}

/// The tree size a signed checkpoint note states (its second line), without
/// checking the signature: stores use it to refuse moving backwards.
pub fn checkpoint_size(note: &[u8]) -> Result<u64, StoreError> {
    let text =
        std::str::from_utf8(note).map_err(|_| StoreError::BadCheckpoint("not UTF-8".into()))?;
    let body = text
        .split_once("\n\n")
        .map_or(text, |(body, _signatures)| body);
    crate::note::Checkpoint::parse(&format!("{body}\n"))
        .map(|c| c.size)
        .map_err(|e| StoreError::BadCheckpoint(e.to_string()))
}

/// Refuses `note` if `stored` (the current checkpoint, if any) covers more.
pub fn check_forward(stored: Option<&[u8]>, note: &[u8]) -> Result<(), StoreError> {
    let offered = checkpoint_size(note)?;
    if let Some(stored) = stored {
        let stored = checkpoint_size(stored)?;
        if stored > offered {
            return Err(StoreError::Stale { stored, offered });
        }
    }
    Ok(())
}

/// A writable log layout. Writes may be buffered until [`LogStore::sync`];
/// the checkpoint is the commit point and must be durable when
/// [`LogStore::publish_checkpoint`] returns.
pub trait LogStore: TileSource {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError>;
    fn sync(&self) -> Result<(), StoreError>;
    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError>;
}

impl<S: LogStore + Send + ?Sized> LogStore for std::sync::Arc<S> {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        (**self).write(path, bytes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        (**self).sync()
    }
    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        (**self).publish_checkpoint(note)
    }
}

impl<S: LogStore + ?Sized> LogStore for &S {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        (**self).write(path, bytes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        (**self).sync()
    }
    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        (**self).publish_checkpoint(note)
    }
}

/// Only the shapes the log writes: no `..`, no absolute paths, no surprises.
pub fn check_path(path: &str) -> Result<(), StoreError> {
    let ok = !path.is_empty()
        && path.len() < 256
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadPath(path.to_owned()))
    }
}

/// Everything in memory: for tests and benchmarks of the log arithmetic.
#[derive(Debug, Default)]
pub struct MemStore {
    files: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemStore {
    pub fn paths(&self) -> Vec<String> {
        self.files.lock().expect("lock").keys().cloned().collect()
    }

    /// Overwrites a file behind the writer's back (tamper tests).
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files
            .lock()
            .expect("lock")
            .insert(path.to_owned(), bytes);
    }
}

impl TileSource for MemStore {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .files
            .lock()
            .map_err(|e| e.to_string())?
            .get(path)
            .cloned())
    }
}

impl LogStore for MemStore {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check_path(path)?;
        self.put(path, bytes.to_vec());
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        let mut files = self.files.lock().expect("lock");
        check_forward(files.get(CHECKPOINT_PATH).map(Vec::as_slice), note)?;
        files.insert(CHECKPOINT_PATH.to_owned(), note.to_vec());
        Ok(())
    }
}

/// The log as plain files under a directory, ready to be served by any static
/// file server. Crash-safe: every file appears whole (temp file + rename), and
/// the checkpoint is replaced only after all files it covers are on disk, so a
/// crash at any point leaves the last checkpoint and its tiles intact.
#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
    made_dirs: Mutex<HashSet<PathBuf>>,
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl DirStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
        Ok(Self {
            root,
            made_dirs: Mutex::new(HashSet::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn write_atomic(&self, path: &str, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
        check_path(path)?;
        let full = self.root.join(path);
        let dir = full
            .parent()
            .expect("joined path has a parent")
            .to_path_buf();
        {
            let mut made = self.made_dirs.lock().expect("lock");
            if !made.contains(&dir) {
                fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
                made.insert(dir.clone());
            }
        }
        let tmp = dir.join(format!(
            ".tmp-{}",
            full.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
        if durable {
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
        }
        drop(f);
        fs::rename(&tmp, &full).map_err(|e| io_err(&full, e))?;
        if durable {
            fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(&dir, e))?;
        }
        Ok(())
    }
}

impl TileSource for DirStore {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        check_path(path).map_err(|e| e.to_string())?;
        match fs::read(self.root.join(path)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{path}: {e}")),
        }
    }
}

impl LogStore for DirStore {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        // Not fsynced one by one: `sync` flushes them all before the checkpoint.
        self.write_atomic(path, bytes, false)
    }

    fn sync(&self) -> Result<(), StoreError> {
        // One syncfs for every tile written since the last checkpoint: far
        // cheaper than an fsync per file at hundreds of tiles per second.
        let dir = fs::File::open(&self.root).map_err(|e| io_err(&self.root, e))?;
        rustix::fs::syncfs(&dir).map_err(|e| io_err(&self.root, e.into()))
    }

    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        // One writer per directory (the embedded coordinator): read, check, replace.
        let stored = self.read(CHECKPOINT_PATH).map_err(StoreError::Backend)?;
        check_forward(stored.as_deref(), note)?;
        self.write_atomic(CHECKPOINT_PATH, note, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_outside_the_layout() {
        for bad in [
            "",
            "/etc/passwd",
            "tile/../x",
            "tile//0",
            "tile/0 /x",
            "a/./b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path("tile/entries/x001/000.p/3").is_ok());
    }
}
