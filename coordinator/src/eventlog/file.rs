//! The embedded event log: append-only segment files under one directory.
//!
//! Record: `len: u32 BE | crc32(payload): u32 BE | payload`. Segments are named by
//! the offset of their first record (`00000000000000000000.log`) and rolled at a
//! size limit; a segment is fsynced before the next one is created, so only the
//! last can have a torn tail, which recovery truncates. One writer thread does
//! group commit: it takes every append waiting, writes them, fsyncs once and
//! acknowledges them all.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use super::{EventLog, EventLogError, MAX_RECORD_BYTES, Pending, Record};

const HEADER_BYTES: u64 = 8;
/// One sparse index entry per this many records: reads seek, then scan at most this many.
const INDEX_EVERY: u64 = 1024;

#[derive(Clone, Copy, Debug)]
pub struct FileLogConfig {
    /// Roll to a new segment once the current one reaches this size.
    pub segment_bytes: u64,
    /// Most bytes one group commit writes before it fsyncs.
    pub max_batch_bytes: usize,
}

impl Default for FileLogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_batch_bytes: 16 << 20,
        }
    }
}

#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    /// Durable bytes: readers never look past this.
    len: u64,
    count: u64,
    /// (offset, byte position) every `INDEX_EVERY` records.
    sparse: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Index {
    segments: Vec<Segment>,
    next: u64,
}

struct Request {
    records: Vec<Vec<u8>>,
    reply: tokio::sync::oneshot::Sender<Result<u64, EventLogError>>,
}

/// The writer's queue and the offset the next queued record will get (the
/// writer commits in queue order, so offsets are known when queued).
#[derive(Debug)]
struct Queue {
    tx: Sender<Request>,
    next: u64,
}

/// The embedded [`EventLog`] adapter.
#[derive(Debug)]
pub struct FileLog {
    dir: PathBuf,
    index: Arc<RwLock<Index>>,
    queue: Mutex<Option<Queue>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn io(path: &Path, source: std::io::Error) -> EventLogError {
    EventLogError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn encode(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("checked against MAX_RECORD_BYTES");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads one record at the reader's position; `Ok(None)` at a clean end, and
/// `Err(why)` for a torn or damaged record.
fn read_record(
    r: &mut impl Read,
    remaining: u64,
) -> std::io::Result<Result<Option<Vec<u8>>, &'static str>> {
    if remaining == 0 {
        return Ok(Ok(None));
    }
    if remaining < HEADER_BYTES {
        return Ok(Err("truncated header"));
    }
    let mut header = [0u8; 8];
    r.read_exact(&mut header)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > MAX_RECORD_BYTES {
        return Ok(Err("length over the record limit"));
    }
    if u64::from(len) > remaining - HEADER_BYTES {
        return Ok(Err("truncated payload"));
    }
    let mut payload = vec![0u8; len_usize];
    r.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != crc {
        return Ok(Err("checksum mismatch"));
    }
    Ok(Ok(Some(payload)))
}

/// Scans a segment, building its sparse index. Returns the segment and, if the
/// file ends in a torn or damaged record, where the good part ends and why.
/// Where a segment's good records end, and why, when its tail is torn or damaged.
type Torn = Option<(u64, &'static str)>;

fn scan(path: &Path, base: u64) -> Result<(Segment, Torn), EventLogError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let file_len = file.metadata().map_err(|e| io(path, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut seg = Segment {
        base,
        path: path.to_path_buf(),
        len: 0,
        count: 0,
        sparse: Vec::new(),
    };
    loop {
        let pos = seg.len;
        match read_record(&mut r, file_len - pos).map_err(|e| io(path, e))? {
            Ok(Some(payload)) => {
                if seg.count.is_multiple_of(INDEX_EVERY) {
                    seg.sparse.push((base + seg.count, pos));
                }
                seg.len += HEADER_BYTES + payload.len() as u64;
                seg.count += 1;
            }
            Ok(None) => return Ok((seg, None)),
            Err(why) => return Ok((seg, Some((pos, why)))),
        }
    }
}

impl FileLog {
    /// Opens (or creates) the log in `dir`, truncating a torn tail left by a crash.
    pub fn open(dir: impl Into<PathBuf>, config: FileLogConfig) -> Result<Self, EventLogError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let mut bases: Vec<u64> = fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        bases.sort_unstable();
        if bases.is_empty() {
            File::create(segment_path(&dir, 0)).map_err(|e| io(&dir, e))?;
            sync_dir(&dir)?;
            bases.push(0);
        }
        let mut index = Index::default();
        for (i, &base) in bases.iter().enumerate() {
            let path = segment_path(&dir, base);
            if base != index.next {
                return Err(EventLogError::Corrupt {
                    path: path.display().to_string(),
                    at: 0,
                    why: "segment does not continue the previous one",
                });
            }
            let (seg, torn) = scan(&path, base)?;
            if let Some((at, why)) = torn {
                if i + 1 != bases.len() {
                    // Sealed segments were fsynced before the next one existed.
                    return Err(EventLogError::Corrupt {
                        path: path.display().to_string(),
                        at,
                        why,
                    });
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io(&path, e))?;
                f.set_len(at)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io(&path, e))?;
            }
            index.next += seg.count;
            index.segments.push(seg);
        }
        let next = index.next;
        let index = Arc::new(RwLock::new(index));
        let (tx, rx) = mpsc::channel();
        let writer = {
            let (writer_dir, writer_index) = (dir.clone(), Arc::clone(&index));
            std::thread::Builder::new()
                .name("eventlog-writer".into())
                .spawn(move || writer_loop(&writer_dir, &writer_index, &rx, config))
                .map_err(|e| io(&dir, e))?
        };
        Ok(Self {
            dir,
            index,
            queue: Mutex::new(Some(Queue { tx, next })),
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of segment files.
    pub fn segments(&self) -> usize {
        self.index.read().expect("index lock").segments.len()
    }
}

fn sync_dir(dir: &Path) -> Result<(), EventLogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn writer_loop(dir: &Path, index: &RwLock<Index>, rx: &Receiver<Request>, config: FileLogConfig) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        // Group commit: everything already waiting goes into this fsync.
        let mut batch = vec![first];
        let mut bytes: usize = batch[0].records.iter().map(Vec::len).sum();
        while bytes < config.max_batch_bytes {
            match rx.try_recv() {
                Ok(req) => {
                    bytes += req.records.iter().map(Vec::len).sum::<usize>();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        let result = match &failed {
            Some(why) => Err(why.clone()),
            None => commit(dir, index, &batch, config).map_err(|e| e.to_string()),
        };
        match result {
            Ok(firsts) => {
                for (req, first) in batch.into_iter().zip(firsts) {
                    let _ = req.reply.send(Ok(first));
                }
            }
            Err(why) => {
                // After a failed write the file's tail is unknown: refuse
                // everything until a restart recovers it.
                failed = Some(why.clone());
                for req in batch {
                    let _ = req.reply.send(Err(EventLogError::Io {
                        path: dir.display().to_string(),
                        source: std::io::Error::other(why.clone()),
                    }));
                }
            }
        }
    }
}

/// Writes one group of appends and fsyncs; returns each request's first offset.
fn commit(
    dir: &Path,
    index: &RwLock<Index>,
    batch: &[Request],
    config: FileLogConfig,
) -> Result<Vec<u64>, EventLogError> {
    let (mut base, mut seg_len, mut next, path) = {
        let idx = index.read().expect("index lock");
        let seg = idx.segments.last().expect("at least one segment");
        (seg.base, seg.len, idx.next, seg.path.clone())
    };
    let mut path = path;
    if seg_len >= config.segment_bytes {
        // Roll: the full segment is already durable; make the new file's name durable too.
        base = next;
        seg_len = 0;
        path = segment_path(dir, base);
        File::create(&path).map_err(|e| io(&path, e))?;
        sync_dir(dir)?;
        index.write().expect("index lock").segments.push(Segment {
            base,
            path: path.clone(),
            len: 0,
            count: 0,
            sparse: Vec::new(),
        });
    }
    let mut buf = Vec::new();
    let mut firsts = Vec::with_capacity(batch.len());
    let mut new_sparse = Vec::new();
    let count_before = next - base;
    for req in batch {
        firsts.push(next);
        for r in &req.records {
            let pos = seg_len + buf.len() as u64;
            if (next - base).is_multiple_of(INDEX_EVERY) {
                new_sparse.push((next, pos));
            }
            encode(r, &mut buf);
            next += 1;
        }
    }
    let mut f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    let written = f.write_all(&buf).and_then(|()| f.sync_data());
    if let Err(e) = written {
        // Cut off whatever part made it, so a later restart sees a clean tail.
        let _ = f.set_len(seg_len);
        return Err(io(&path, e));
    }
    let mut idx = index.write().expect("index lock");
    let seg = idx.segments.last_mut().expect("segment");
    debug_assert_eq!(seg.count, count_before);
    seg.len += buf.len() as u64;
    seg.count = next - base;
    seg.sparse.extend(new_sparse);
    idx.next = next;
    Ok(firsts)
}

impl EventLog for FileLog {
    fn submit(&self, records: Vec<Vec<u8>>) -> Result<Pending, EventLogError> {
        if let Some(r) = records.iter().find(|r| r.len() > MAX_RECORD_BYTES) {
            return Err(EventLogError::RecordTooLarge(r.len()));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mut queue = self.queue.lock().expect("queue lock");
        let queue = queue.as_mut().ok_or(EventLogError::Closed)?;
        let (first, count) = (queue.next, records.len() as u64);
        queue
            .tx
            .send(Request { records, reply })
            .map_err(|_| EventLogError::Closed)?;
        queue.next += count;
        Ok(Pending::new(first, count, answer))
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, EventLogError> {
        // Positions of what to read, taken under the lock; the reading happens outside it.
        let plan: Vec<(PathBuf, u64, u64, u64)> = {
            let idx = self.index.read().expect("index lock");
            let start = idx.segments.partition_point(|s| s.base + s.count <= from);
            idx.segments[start..]
                .iter()
                .filter(|s| s.count > 0)
                .map(|s| {
                    let at = from.max(s.base);
                    let i = s
                        .sparse
                        .partition_point(|(o, _)| *o <= at)
                        .saturating_sub(1);
                    let (o, pos) = s.sparse[i];
                    (s.path.clone(), o, pos, s.len)
                })
                .collect()
        };
        let mut out = Vec::new();
        for (path, mut offset, pos, len) in plan {
            let mut f = File::open(&path).map_err(|e| io(&path, e))?;
            f.seek(SeekFrom::Start(pos)).map_err(|e| io(&path, e))?;
            let mut r = BufReader::new(f);
            let mut at = pos;
            while out.len() < max_records {
                match read_record(&mut r, len - at).map_err(|e| io(&path, e))? {
                    Ok(Some(payload)) => {
                        at += HEADER_BYTES + payload.len() as u64;
                        if offset >= from {
                            out.push(Record { offset, payload });
                        }
                        offset += 1;
                    }
                    Ok(None) => break,
                    Err(why) => {
                        return Err(EventLogError::Corrupt {
                            path: path.display().to_string(),
                            at,
                            why,
                        });
                    }
                }
            }
            if out.len() >= max_records {
                break;
            }
        }
        Ok(out)
    }

    fn next_offset(&self) -> u64 {
        self.index.read().expect("index lock").next
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it commits what it has.
        self.queue.lock().expect("queue lock").take();
        if let Some(w) = self.writer.lock().expect("writer lock").take() {
            let _ = w.join();
        }
    }
}
