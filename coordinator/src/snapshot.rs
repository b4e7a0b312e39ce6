//! Snapshots of every projection at one event-log offset, so that start-up
//! replays only the records after the newest snapshot instead of the whole log.
//!
//! A snapshot is taken from a fold of the durable log, never from live state:
//! at start-up right after the replay (nothing is queued then), and by a
//! background thread that tails the log with projections of its own. It only
//! covers ledger entries already published, so the ledger log never needs an
//! entry the snapshot skipped. File: the snapshot's JSON, a newline, and the
//! BLAKE3 hex of the JSON; written to a temporary file, fsynced, renamed. A
//! file that does not check is ignored (a full replay is always correct).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troop_ledger::fold::Ledger;
use troop_schemas::{ApiKeyId, JobId, WorkerId};

use crate::books::{BooksError, Start, TAG_LEDGER_ENTRY, fold_ledger_record};
use crate::eventlog::{EventLog, Record};
use crate::history::WorkerHistory;
use crate::keys::{Stored, TAG_KEY_EVENT};
use crate::server::{BanEvent, TAG_BAN_EVENT};

pub const SNAPSHOT_VERSION: u32 = 2;
/// Snapshots kept on disk; older ones are deleted.
const KEEP: usize = 2;
const READ_BATCH: usize = 4096;

/// Every projection of the event log at `offset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// Records folded: replay resumes at this offset.
    pub offset: u64,
    /// Ledger entries among them.
    pub entries: u64,
    pub ledger: Ledger,
    pub receipts: HashMap<JobId, u64>,
    pub keys: HashMap<ApiKeyId, Stored>,
    pub bans: HashSet<WorkerId>,
    pub history: WorkerHistory,
}

impl Snapshot {
    pub fn empty() -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            ..Self::default()
        }
    }

    /// Splits off the ledger part, where [`crate::books::Books::open_at`]
    /// starts; what remains holds the other projections.
    pub fn split(mut self) -> (Start, Self) {
        let start = Start {
            offset: self.offset,
            entries: self.entries,
            ledger: std::mem::take(&mut self.ledger),
            receipts: std::mem::take(&mut self.receipts),
        };
        (start, self)
    }

    /// Puts a ledger part back (after a replay): a whole snapshot again.
    pub fn join(mut self, start: Start) -> Self {
        self.offset = start.offset;
        self.entries = start.entries;
        self.ledger = start.ledger;
        self.receipts = start.receipts;
        self
    }

    /// Folds a record that is not a ledger entry: keys, bans, worker events.
    pub fn fold_other(&mut self, payload: &[u8]) -> Result<(), String> {
        match payload.split_first() {
            Some((&TAG_KEY_EVENT, _)) => {
                // The table only: hashing happens on the live side.
                let mut keys =
                    crate::keys::ApiKeys::with_table([0; 32], std::mem::take(&mut self.keys));
                let folded = keys.apply_record(payload);
                self.keys = keys.into_table();
                folded?;
            }
            Some((&TAG_BAN_EVENT, body)) => {
                let BanEvent::Banned { worker, .. } =
                    serde_json::from_slice(body).map_err(|e| e.to_string())?;
                self.bans.insert(worker);
            }
            _ => self.history.apply_record(payload)?,
        }
        Ok(())
    }

    /// Folds the next record (the one at `self.offset`).
    pub fn fold(&mut self, record: &Record) -> Result<(), BooksError> {
        assert_eq!(record.offset, self.offset, "records fold in order");
        let ledger_entry = fold_ledger_record(
            &mut self.ledger,
            &mut self.receipts,
            &mut self.entries,
            record,
        )?;
        if ledger_entry.is_none() {
            self.fold_other(&record.payload)
                .map_err(|why| BooksError::Corrupt {
                    offset: record.offset,
                    why,
                })?;
        }
        self.offset += 1;
        Ok(())
    }

    fn path(dir: &Path, offset: u64) -> PathBuf {
        dir.join(format!("{offset:020}.snapshot"))
    }

    /// Writes the snapshot durably into `dir` and deletes all but the newest few.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let path = Self::path(dir, self.offset);
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            writeln!(f)?;
            f.write_all(blake3::hash(&json).to_hex().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        let mut all = Self::list(dir);
        all.sort_unstable();
        for (_, old) in all.iter().rev().skip(KEEP) {
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let offset = name.to_str()?.strip_suffix(".snapshot")?.parse().ok()?;
                Some((offset, e.path()))
            })
            .collect()
    }

    /// Reads one snapshot file, checking its digest and version.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let split = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or("no digest line")?;
        let (json, digest) = (&bytes[..split], &bytes[split + 1..]);
        if blake3::hash(json).to_hex().as_bytes() != digest {
            return Err("digest does not match".into());
        }
        let s: Self = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        if s.version != SNAPSHOT_VERSION {
            return Err(format!("version {} is not {SNAPSHOT_VERSION}", s.version));
        }
        s.ledger.check_invariants()?;
        Ok(s)
    }

    /// The newest snapshot in `dir` that checks and does not lie past the end
    /// of the log (`log_end`, its next offset); `None` means replay in full.
    pub fn latest(dir: &Path, log_end: u64) -> Option<Self> {
        let mut all = Self::list(dir);
        all.sort_unstable();
        for (offset, path) in all.into_iter().rev() {
            if offset > log_end {
                tracing::warn!(path = %path.display(), "snapshot past the end of the event log; ignored");
                continue;
            }
            match Self::read(&path) {
                Ok(s) if s.offset == offset => return Some(s),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "snapshot name and content disagree; ignored")
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), %why, "unusable snapshot ignored")
                }
            }
        }
        None
    }
}

/// Tails the durable event log with its own projections from `start` and
/// writes a snapshot whenever `every_records` more records are folded. It
/// stops before the first ledger entry not yet covered by a signed checkpoint
/// (`published`, kept current by the books), so every snapshot is usable.
pub fn spawn_snapshotter(
    events: Arc<dyn EventLog>,
    dir: PathBuf,
    mut state: Snapshot,
    every_records: u64,
    published: Arc<AtomicU64>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("snapshotter".into())
        .spawn(move || {
            let mut last_written = state.offset;
            loop {
                std::thread::sleep(Duration::from_secs(5));
                if events.next_offset().saturating_sub(last_written) < every_records {
                    continue;
                }
                if let Err(e) = catch_up(&*events, &mut state, published.load(Ordering::SeqCst)) {
                    tracing::error!(error = %e, "snapshotter stopped: the log does not fold");
                    return;
                }
                if state.offset.saturating_sub(last_written) < every_records {
                    continue;
                }
                match state.write(&dir) {
                    Ok(path) => {
                        last_written = state.offset;
                        tracing::info!(path = %path.display(), offset = state.offset, "snapshot written");
                    }
                    Err(e) => tracing::error!(error = %e, "writing a snapshot failed"),
                }
            }
        })
        .map(|_| ())
}

/// Folds durable records into `state` up to the end of the log or the first
/// ledger entry at index `published` or later, whichever comes first.
pub fn catch_up(
    events: &dyn EventLog,
    state: &mut Snapshot,
    published: u64,
) -> Result<(), BooksError> {
    loop {
        let batch = events.read(state.offset, READ_BATCH)?;
        if batch.is_empty() {
            return Ok(());
        }
        for record in &batch {
            let is_entry = record.payload.first() == Some(&TAG_LEDGER_ENTRY);
            if is_entry && state.entries >= published {
                return Ok(());
            }
            state.fold(record)?;
        }
    }
}
