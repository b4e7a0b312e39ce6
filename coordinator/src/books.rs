//! The books: every balance-affecting decision, made durable in the event log
//! before it takes effect, folded into balances, and published as the signed
//! ledger auditors read.
//!
//! Order of a commit: check each event against the projection and apply it;
//! queue the accepted ones on the event log; the caller acknowledges only once
//! they are durable ([`Pending`]). Queuing without waiting lets the commits of
//! concurrent requests share one fsync (group commit) while the projection
//! stays the single serial judge of every balance. If a write fails the
//! projection is ahead of the log: the log refuses everything after, so nothing
//! more is acknowledged, and a restart rebuilds the books from the log
//! (crash-only). The ledger log (tiles, checkpoint) takes an entry only once
//! its event-log record is durable, so no signed checkpoint ever covers an
//! entry a crash could lose; it is caught up on every start.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use troop_ledger::fold::{FoldError, Hold, Ledger};
use troop_ledger::note::NoteSigner;
use troop_ledger::store::CHECKPOINT_PATH;
use troop_ledger::store::DirStore;
use troop_ledger::tile::TileSource as _;
use troop_ledger::writer::{LogWriter, WriterError};
use troop_schemas::{EntryError, Event, HoldId, JobId, VoidReason, decode_entry, encode_entry};

use crate::eventlog::{EventLog, EventLogError, Pending};

/// Event-log records start with a tag byte, so that heartbeat summaries and job
/// events can share the log with ledger entries.
pub const TAG_LEDGER_ENTRY: u8 = 0x01;

/// Records read per step while replaying.
const REPLAY_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BooksError {
    #[error(transparent)]
    Refused(#[from] FoldError),
    #[error("event cannot be encoded: {0}")]
    Encoding(#[from] EntryError),
    #[error("event log: {0}")]
    EventLog(#[from] EventLogError),
    #[error("ledger log: {0}")]
    Ledger(#[from] WriterError),
    #[error("event log record {offset} is unusable: {why}")]
    Corrupt { offset: u64, why: String },
    #[error("the books stopped after a failed write; restart to recover from the event log")]
    Poisoned,
    #[error("snapshot at ledger entry {snapshot} is past the published ledger ({published})")]
    SnapshotAhead { snapshot: u64, published: u64 },
}

/// Where a replay starts: the beginning of the log, or a snapshot of the
/// ledger projection taken at `offset`.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// Event-log records already folded.
    pub offset: u64,
    /// Ledger entries among them.
    pub entries: u64,
    pub ledger: Ledger,
    pub receipts: HashMap<JobId, u64>,
}

/// Folds one event-log record into the ledger projection (`entries` counts
/// ledger entries; `receipts` indexes settlements). Returns the entry's bytes
/// when the record is a ledger entry, `None` for any other record.
pub fn fold_ledger_record<'a>(
    ledger: &mut Ledger,
    receipts: &mut HashMap<JobId, u64>,
    entries: &mut u64,
    record: &'a crate::eventlog::Record,
) -> Result<Option<&'a [u8]>, BooksError> {
    let Some((&TAG_LEDGER_ENTRY, entry)) = record.payload.split_first() else {
        return Ok(None);
    };
    let corrupt = |why: String| BooksError::Corrupt {
        offset: record.offset,
        why,
    };
    let event = decode_entry(entry).map_err(|e| corrupt(e.to_string()))?;
    ledger
        .apply(&event)
        .map_err(|e| corrupt(format!("refused on replay: {e}")))?;
    if let Event::HoldSettled { receipt, .. } = &event {
        receipts.insert(receipt.receipt.job, *entries);
    }
    *entries += 1;
    Ok(Some(entry))
}

/// Judges `events` in order against `ledger` (first `admit`, then the fold),
/// applying the accepted ones: one verdict per event (the accepted event's
/// place among the accepted, or why it was refused: a refusal changes nothing
/// and does not stop the others), and the accepted ones' canonical entries.
/// The most holds one expiry round expires; the rest wait for the next
/// round (a second later), so a backlog never makes one huge batch.
pub const MAX_EXPIRIES_PER_ROUND: usize = 4_096;

/// The expiries of the open holds in `ledger` whose deadline is at or before
/// `now_ms`, and the voids of those whose origin (the node incarnation whose
/// request they are for) is in `dead_origins`, among the holds `mine` takes
/// (a cluster owner: its own accounts'), in hold id order, at most
/// [`MAX_EXPIRIES_PER_ROUND`]. The embedded books and a partition's owner
/// both close holds with it.
pub fn due_expiries(
    ledger: &Ledger,
    now_ms: u64,
    dead_origins: &BTreeSet<String>,
    mine: impl Fn(&Hold) -> bool,
) -> Vec<Event> {
    let mut due: Vec<(HoldId, bool)> = ledger
        .open_holds()
        .filter(|(_, h)| mine(h))
        .filter_map(|(id, h)| {
            if h.expires_at_ms <= now_ms {
                Some((*id, true))
            } else {
                let dead = h.origin.as_ref().is_some_and(|o| dead_origins.contains(o));
                dead.then_some((*id, false))
            }
        })
        .collect();
    due.sort_unstable();
    due.truncate(MAX_EXPIRIES_PER_ROUND);
    due.into_iter()
        .map(|(hold, expired)| {
            if expired {
                Event::HoldExpired {
                    hold,
                    at_ms: now_ms,
                }
            } else {
                // Its request died with its node.
                Event::HoldVoided {
                    hold,
                    reason: VoidReason::CoordinatorRestart,
                    at_ms: now_ms,
                }
            }
        })
        .collect()
}

/// The embedded books and a cluster partition's owner judge with this one
/// function; they differ only in where the records go ([`ledger_record`]).
pub fn judge<E: From<FoldError> + From<EntryError>>(
    ledger: &mut Ledger,
    events: &[Event],
    mut admit: impl FnMut(&Ledger, &Event) -> Result<(), E>,
) -> (Vec<Result<usize, E>>, Vec<Vec<u8>>) {
    let mut entries = Vec::new();
    let verdicts = events
        .iter()
        .map(|event| {
            admit(ledger, event)?;
            let encoded = encode_entry(event)?;
            ledger.apply(event)?;
            entries.push(encoded);
            Ok(entries.len() - 1)
        })
        .collect();
    (verdicts, entries)
}

/// The event-log record of a ledger entry: its tag, then the entry.
pub fn ledger_record(entry: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(entry.len() + 1);
    record.push(TAG_LEDGER_ENTRY);
    record.extend_from_slice(entry);
    record
}

/// One verdict per event (its ledger index, or why it was refused), and the
/// durability to wait for before acknowledging (none if nothing was accepted).
pub type Submitted = (Vec<Result<u64, BooksError>>, Option<Pending>);

/// Balances (the projection), the event log they come from, and the ledger they are published as.
///
/// Judging ([`Books::submit`]) and integration ([`Integration`]: tiles,
/// checkpoints) are apart, so that the threads asking for verdicts share one
/// short lock and a checkpoint's writes and fsync never hold up a verdict.
pub struct Books {
    events: Arc<dyn EventLog>,
    ledger: Ledger,
    /// Ledger entries in the event log: the index the next one gets.
    entries: u64,
    /// Ledger index of each settled job's receipt. In memory for the embedded
    /// default (~50 B a receipt); a Postgres projection in the cluster.
    receipts: HashMap<JobId, u64>,
    integration: Arc<Integration>,
    poisoned: bool,
}

impl std::fmt::Debug for Books {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Books(entries={}, poisoned={})",
            self.entries, self.poisoned
        )
    }
}

/// The ledger log fed by the books: an entry goes in once its event-log
/// record is durable, and a checkpoint signs what went in. Shared by the
/// books (which queue entries) and whoever integrates and reads proofs.
///
/// Locks: `writer` before `queued`, and `queued` is held only to push or
/// pop, so the books (which take `queued` alone) never wait on a checkpoint.
pub struct Integration {
    events: Arc<dyn EventLog>,
    /// Ledger entries queued on the event log and not yet in the ledger log,
    /// by event-log offset, in offset order.
    queued: Mutex<VecDeque<(u64, Vec<u8>)>>,
    writer: Mutex<LogWriter<DirStore>>,
    /// Size of the last signed checkpoint, for readers on other threads.
    published: Arc<AtomicU64>,
}

impl std::fmt::Debug for Integration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Integration(published={})",
            self.published.load(Ordering::SeqCst)
        )
    }
}

impl Integration {
    /// Queues the books' accepted entries, the first at event-log `offset`.
    fn queue(&self, offset: u64, entries: Vec<Vec<u8>>) {
        let mut queued = self.queued.lock().expect("queue lock");
        debug_assert!(queued.back().is_none_or(|(last, _)| *last < offset));
        queued.extend((offset..).zip(entries));
    }

    /// Moves entries whose event-log records are durable into the ledger log.
    fn sequence(&self, writer: &mut LogWriter<DirStore>) -> Result<(), BooksError> {
        let durable = self.events.next_offset();
        let ready: Vec<Vec<u8>> = {
            let mut queued = self.queued.lock().expect("queue lock");
            let n = queued.partition_point(|(offset, _)| *offset < durable);
            queued.drain(..n).map(|(_, entry)| entry).collect()
        };
        for entry in ready {
            writer.append(entry)?;
        }
        Ok(())
    }

    /// Ledger entries queued on the event log and not yet known durable.
    pub fn undurable(&self) -> u64 {
        let durable = self.events.next_offset();
        let queued = self.queued.lock().expect("queue lock");
        (queued.len() - queued.partition_point(|(offset, _)| *offset < durable)) as u64
    }

    /// Size of the last signed checkpoint.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    /// Integrates and signs a new checkpoint if anything was committed since the last.
    pub fn publish(&self) -> Result<(u64, troop_ledger::Hash), BooksError> {
        let mut writer = self.writer.lock().expect("writer lock");
        self.sequence(&mut writer)?;
        self.sign(&mut writer)
    }

    /// Signs what `writer` holds (a no-op when nothing is new) and tells
    /// other threads its size.
    fn sign(
        &self,
        writer: &mut LogWriter<DirStore>,
    ) -> Result<(u64, troop_ledger::Hash), BooksError> {
        let cp = writer.publish()?;
        self.published.store(cp.size, Ordering::SeqCst);
        Ok((cp.size, cp.root))
    }

    /// The receipt at ledger `index`: published (a checkpoint is signed now
    /// if the entry is newer than the last one) and proved; `None` while its
    /// record is not yet durable.
    pub fn receipt(&self, index: u64) -> Result<Option<crate::reads::LoggedReceipt>, BooksError> {
        let mut writer = self.writer.lock().expect("writer lock");
        self.sequence(&mut writer)?;
        if index >= writer.size() {
            // Settled but not yet durable: its request has not been answered either.
            return Ok(None);
        }
        if index >= writer.published().size {
            self.sign(&mut writer)?;
        }
        let store = writer.store();
        let note = store
            .read(CHECKPOINT_PATH)
            .and_then(|n| n.ok_or_else(|| "no checkpoint".to_owned()))
            .and_then(|n| String::from_utf8(n).map_err(|_| "checkpoint is not UTF-8".to_owned()))
            .map_err(|why| BooksError::Corrupt { offset: index, why })?;
        crate::reads::prove(store, &note, writer.published(), index)
            .map(Some)
            .map_err(|why| BooksError::Corrupt { offset: index, why })
    }
}

/// Outcome of replaying the event log on start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub records: u64,
    pub entries: u64,
    /// Entries the ledger log had not published before the last stop.
    pub republished: u64,
}

impl Books {
    /// Rebuilds the books from `events` and catches the ledger in `ledger_dir` up.
    pub fn open(
        events: Arc<dyn EventLog>,
        ledger_dir: &std::path::Path,
        signer: NoteSigner,
    ) -> Result<(Self, Recovery), BooksError> {
        Self::open_with(events, ledger_dir, signer, &mut |_| Ok(()))
    }

    /// [`Books::open`], handing every record that is not a ledger entry (keys,
    /// bans) to `other`, so that the log is replayed once for every projection.
    pub fn open_with(
        events: Arc<dyn EventLog>,
        ledger_dir: &std::path::Path,
        signer: NoteSigner,
        other: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(Self, Recovery), BooksError> {
        Self::open_at(events, ledger_dir, signer, Start::default(), other)
    }

    /// [`Books::open_with`] from `start` (a snapshot) instead of the log's
    /// beginning: only the records after it are replayed. A snapshot past the
    /// published ledger cannot be used (the ledger log would miss the entries
    /// in between): [`BooksError::SnapshotAhead`], and the caller replays in full.
    pub fn open_at(
        events: Arc<dyn EventLog>,
        ledger_dir: &std::path::Path,
        signer: NoteSigner,
        start: Start,
        other: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(Self, Recovery), BooksError> {
        let mut writer = LogWriter::open(
            DirStore::open(ledger_dir).map_err(WriterError::from)?,
            signer,
        )?;
        let published = writer.size();
        if start.entries > published {
            return Err(BooksError::SnapshotAhead {
                snapshot: start.entries,
                published,
            });
        }
        let Start {
            mut offset,
            mut entries,
            mut ledger,
            mut receipts,
        } = start;
        let mut republished = 0u64;
        loop {
            let batch = events.read(offset, REPLAY_BATCH)?;
            if batch.is_empty() {
                break;
            }
            for record in batch {
                offset = record.offset + 1;
                match fold_ledger_record(&mut ledger, &mut receipts, &mut entries, &record)? {
                    Some(entry) => {
                        // `entries` now counts this one: its index is entries - 1.
                        if entries > published {
                            writer.append(entry.to_vec())?;
                            republished += 1;
                        }
                    }
                    None => other(&record.payload).map_err(|why| BooksError::Corrupt {
                        offset: record.offset,
                        why,
                    })?,
                }
            }
        }
        if entries < published {
            return Err(BooksError::Corrupt {
                offset,
                why: format!(
                    "the ledger has {published} entries but the event log only {entries}: wrong data directory?"
                ),
            });
        }
        let published_now = writer.publish()?.size;
        ledger
            .check_invariants()
            .map_err(|why| BooksError::Corrupt { offset, why })?;
        let recovery = Recovery {
            records: offset,
            entries,
            republished,
        };
        let integration = Arc::new(Integration {
            events: Arc::clone(&events),
            queued: Mutex::new(VecDeque::new()),
            writer: Mutex::new(writer),
            published: Arc::new(AtomicU64::new(published_now)),
        });
        Ok((
            Self {
                events,
                ledger,
                entries,
                receipts,
                integration,
                poisoned: false,
            },
            recovery,
        ))
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The ledger log these books feed, for integrating and proving apart
    /// from judging.
    pub fn integration(&self) -> Arc<Integration> {
        Arc::clone(&self.integration)
    }

    /// Ledger records queued on the event log and not yet known durable.
    pub fn undurable(&self) -> u64 {
        self.integration.undurable()
    }

    /// Committed entries not yet covered by a signed checkpoint.
    pub fn lag(&self) -> u64 {
        self.entries.saturating_sub(self.integration.published())
    }

    /// Ledger entries so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The ledger projection as it stands, for a snapshot taken when nothing
    /// is queued (right after opening).
    pub fn start_here(&self, offset: u64) -> Start {
        debug_assert!(
            self.integration
                .queued
                .lock()
                .expect("queue lock")
                .is_empty(),
            "a snapshot holds durable state only"
        );
        Start {
            offset,
            entries: self.entries,
            ledger: self.ledger.clone(),
            receipts: self.receipts.clone(),
        }
    }

    /// Size of the last signed checkpoint.
    pub fn published(&self) -> u64 {
        self.integration.published()
    }

    /// The size of the last signed checkpoint, kept current for other threads.
    pub fn published_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.integration.published)
    }

    /// Checks and commits `events` in order, as one durable batch. Each gets its
    /// own verdict: a refused event changes nothing and does not stop the others.
    /// Returns each accepted event's ledger index.
    pub fn commit(&mut self, events: &[Event]) -> Result<Vec<Result<u64, BooksError>>, BooksError> {
        let (verdicts, pending) = self.submit(events)?;
        if let Some(p) = pending
            && let Err(e) = p.wait()
        {
            self.poisoned = true;
            return Err(e.into());
        }
        let mut writer = self.integration.writer.lock().expect("writer lock");
        self.integration.sequence(&mut writer)?;
        Ok(verdicts)
    }

    /// [`Books::commit`] without waiting: the accepted events are applied and
    /// queued on the event log; their effect may be acknowledged only once the
    /// returned [`Pending`] (none if nothing was accepted) resolves.
    pub fn submit(&mut self, events: &[Event]) -> Result<Submitted, BooksError> {
        if self.poisoned {
            return Err(BooksError::Poisoned);
        }
        let (judged, entries) = judge(&mut self.ledger, events, |_, _| Ok::<_, BooksError>(()));
        let verdicts = judged
            .into_iter()
            .zip(events)
            .map(|(verdict, event)| {
                let index = self.entries + verdict? as u64;
                if let Event::HoldSettled { receipt, .. } = event {
                    self.receipts.insert(receipt.receipt.job, index);
                }
                Ok(index)
            })
            .collect();
        if entries.is_empty() {
            return Ok((verdicts, None));
        }
        let records = entries.iter().map(|e| ledger_record(e)).collect();
        let pending = match self.events.submit(records) {
            Ok(p) => p,
            Err(e) => {
                self.poisoned = true;
                return Err(e.into());
            }
        };
        self.entries += entries.len() as u64;
        self.integration.queue(pending.first, entries);
        Ok((verdicts, Some(pending)))
    }

    /// Ledger index of a settled job's receipt.
    pub fn receipt_index(&self, job: &JobId) -> Option<u64> {
        self.receipts.get(job).copied()
    }

    /// A settled job's receipt: its ledger entry, published (a checkpoint is
    /// signed now if the entry is newer than the last one) and proved.
    pub fn receipt(&self, job: &JobId) -> Result<Option<crate::reads::LoggedReceipt>, BooksError> {
        match self.receipt_index(job) {
            Some(index) => self.integration.receipt(index),
            None => Ok(None),
        }
    }

    /// One event; its refusal is an error.
    pub fn commit_one(&mut self, event: &Event) -> Result<u64, BooksError> {
        self.commit(std::slice::from_ref(event))?
            .pop()
            .expect("one verdict per event")
    }

    /// Integrates and signs a new checkpoint if anything was committed since the last.
    pub fn publish(&self) -> Result<(u64, troop_ledger::Hash), BooksError> {
        self.integration.publish()
    }

    /// Expires the open holds whose deadline is at or before `now_ms` (at
    /// most [`MAX_EXPIRIES_PER_ROUND`] a call), releasing their credits. A hold outlives its request only if the request
    /// was lost (a stuck handler, a dead node); this bounds how long credits
    /// stay locked. Queued, not awaited: nobody waits on an expiry, and the
    /// ledger log takes the entries once they are durable.
    pub fn expire_holds(&mut self, now_ms: u64) -> Result<usize, BooksError> {
        let expiries = due_expiries(&self.ledger, now_ms, &BTreeSet::new(), |_| true);
        if expiries.is_empty() {
            return Ok(0);
        }
        let (verdicts, _pending) = self.submit(&expiries)?;
        let mut expired = 0;
        for verdict in verdicts {
            verdict?;
            expired += 1;
        }
        Ok(expired)
    }

    /// On a single node, a hold still open at start belonged to a request that
    /// died with the previous process: release it, charging nothing.
    pub fn void_orphaned_holds(&mut self, now_ms: u64) -> Result<usize, BooksError> {
        let mut holds: Vec<_> = self.ledger.open_holds().map(|(id, _)| *id).collect();
        holds.sort_unstable();
        let voids: Vec<Event> = holds
            .into_iter()
            .map(|hold| Event::HoldVoided {
                hold,
                reason: VoidReason::CoordinatorRestart,
                at_ms: now_ms,
            })
            .collect();
        let n = voids.len();
        for verdict in self.commit(&voids)? {
            verdict?;
        }
        Ok(n)
    }
}
