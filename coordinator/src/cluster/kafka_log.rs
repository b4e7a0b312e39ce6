//! The event log on one Kafka partition, behind the same [`EventLog`] port as
//! the embedded file log (and through the same conformance suite).
//!
//! One writer per partition at a time: opening the log calls
//! `init_transactions` with the partition's transactional id, which fences any
//! earlier writer (a node that lost the partition cannot append any more).
//! Every group commit is one Kafka transaction; readers see only committed
//! records (`read_committed`).
//!
//! The port's offsets are contiguous record numbers. Kafka's offsets are not
//! (each commit leaves a marker), so every record carries its number in the
//! `troop-seq` header; reads map numbers to Kafka offsets (CLUSTER.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::eventlog::{EventLog, EventLogError, MAX_RECORD_BYTES, Pending, Record};

/// The header holding a record's number.
const SEQ_HEADER: &str = "troop-seq";
/// Most bytes one transaction carries before the writer commits it.
const MAX_COMMIT_BYTES: usize = 16 << 20;
/// How long a broker call may take before the log gives up on it.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct KafkaLogConfig {
    pub brokers: String,
    pub topic: String,
    pub partition: i32,
    /// Names the one writer of this partition; a new writer with the same id
    /// fences the old one.
    pub transactional_id: String,
}

impl KafkaLogConfig {
    /// The owner's log of ledger partition `partition` (CLUSTER.md, "Who
    /// judges an account's money"): one fenced writer per partition.
    pub fn ledger_owner(cluster: &crate::config::ClusterConfig, partition: i32) -> Self {
        Self {
            brokers: cluster.kafka_brokers.clone(),
            topic: format!("{}.ledger", cluster.topic_prefix),
            partition,
            transactional_id: format!("{}-ledger-{partition}", cluster.topic_prefix),
        }
    }
}

struct Request {
    first: u64,
    records: Vec<Vec<u8>>,
    reply: tokio::sync::oneshot::Sender<Result<u64, EventLogError>>,
}

/// Numbers handed out, and the queue to the writer, under one lock: a record
/// reaches the writer in the order of its number.
struct Queue {
    next: u64,
    tx: Option<mpsc::Sender<Request>>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Records committed: the next number a reader can wait for.
    durable: AtomicU64,
    /// A commit failed: the log refuses every later append.
    failed: AtomicBool,
}

/// Where the last read ended: the next record's number and its Kafka offset
/// at the latest (markers may sit in between).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    seq: u64,
    kafka: i64,
}

pub struct KafkaLog {
    config: KafkaLogConfig,
    queue: Mutex<Queue>,
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    reader: Mutex<PartitionReader>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topic", &self.config.topic)
            .field("partition", &self.config.partition)
            .finish()
    }
}

fn broker(e: impl std::fmt::Display) -> EventLogError {
    EventLogError::Broker(e.to_string())
}

fn seq_of(message: &impl rdkafka::message::Message) -> Result<u64, EventLogError> {
    let headers = message
        .headers()
        .ok_or_else(|| broker("a record without the troop-seq header"))?;
    let header = headers
        .iter()
        .find(|h| h.key == SEQ_HEADER)
        .ok_or_else(|| broker("a record without the troop-seq header"))?;
    let bytes: [u8; 8] = header
        .value
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| broker("a troop-seq header that is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

impl KafkaLog {
    /// Opens the partition's log as its one writer (fencing any other) and
    /// finds where it ends.
    pub fn open(config: KafkaLogConfig) -> Result<Self, EventLogError> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("transactional.id", &config.transactional_id)
            .set("enable.idempotence", "true")
            .set("message.max.bytes", (2 * MAX_RECORD_BYTES).to_string())
            .set("linger.ms", "0")
            // A transaction begun right after a commit is often told the
            // previous one is still finishing (CONCURRENT_TRANSACTIONS);
            // librdkafka's default 100 ms back-off would add that to commits.
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "50")
            .create()
            .map_err(broker)?;
        producer.init_transactions(BROKER_TIMEOUT).map_err(broker)?;
        let mut reader = PartitionReader::open(&config.brokers, &config.topic, config.partition)?;
        let end = reader.end()?;
        let shared = Arc::new(Shared::default());
        shared.durable.store(end, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let writer = {
            let shared = Arc::clone(&shared);
            let config = config.clone();
            std::thread::Builder::new()
                .name(format!("kafka-log-{}", config.partition))
                .spawn(move || writer_loop(&producer, &config, &rx, &shared))
                .map_err(|e| broker(format!("starting the writer: {e}")))?
        };
        Ok(Self {
            config,
            queue: Mutex::new(Queue {
                next: end,
                tx: Some(tx),
            }),
            shared,
            writer: Some(writer),
            reader: Mutex::new(reader),
        })
    }
}

/// Reads one partition's committed records by record number, without
/// writing (the sequencer reads every owner's partition this way).
pub struct PartitionReader {
    topic: String,
    partition: i32,
    consumer: BaseConsumer<ReaderContext>,
    cursor: Option<Cursor>,
}

/// The reader asks for end-of-partition events (that is how it knows it read
/// everything visible); librdkafka also reports each one as a "global error",
/// which the default context would log at error level on every idle poll.
#[derive(Debug, Clone, Copy)]
pub struct ReaderContext;

impl rdkafka::client::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::error!(%error, reason, "kafka reader");
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

impl std::fmt::Debug for PartitionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReader")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish()
    }
}

impl PartitionReader {
    pub fn open(brokers: &str, topic: &str, partition: i32) -> Result<Self, EventLogError> {
        let consumer: BaseConsumer<ReaderContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("troop-reader-{topic}-{partition}"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set(
                "fetch.message.max.bytes",
                (2 * MAX_RECORD_BYTES).to_string(),
            )
            .create_with_context(ReaderContext)
            .map_err(broker)?;
        Ok(Self {
            topic: topic.to_owned(),
            partition,
            consumer,
            cursor: None,
        })
    }

    /// The number the next committed record will have.
    pub fn end(&mut self) -> Result<u64, EventLogError> {
        let last = self.last_record();
        self.consumer.unassign().map_err(broker)?;
        Ok(last?.map_or(0, |(seq, _)| seq + 1))
    }

    /// Up to `max_records` committed records from number `from` on. With
    /// `until`, records below it are known committed and are waited for;
    /// without, the read stops at the end of what is visible now.
    pub fn read(
        &mut self,
        from: u64,
        max_records: usize,
        until: Option<u64>,
    ) -> Result<Vec<Record>, EventLogError> {
        if until.is_some_and(|u| from >= u) || max_records == 0 {
            return Ok(Vec::new());
        }
        let at = match self.cursor {
            Some(c) if c.seq == from => c.kafka,
            _ => self.locate(from)?,
        };
        self.assign(at)?;
        let read = self.read_assigned(from, max_records, until);
        // Assigned only while reading: librdkafka keeps fetching an assigned
        // partition, and against a broker that answers an empty fetch at once
        // (noida-db does) that is a busy loop on both sides between reads.
        let released = self.consumer.unassign().map_err(broker);
        let records = read?;
        released?;
        Ok(records)
    }

    fn read_assigned(
        &mut self,
        from: u64,
        max_records: usize,
        until: Option<u64>,
    ) -> Result<Vec<Record>, EventLogError> {
        let want = until.map_or(max_records, |u| {
            usize::try_from(u - from)
                .unwrap_or(usize::MAX)
                .min(max_records)
        });
        let mut out = Vec::with_capacity(want.min(4096));
        // Committed records may take a moment to become visible to a reader
        // (the commit marker goes out after the commit returns).
        let deadline = std::time::Instant::now() + BROKER_TIMEOUT;
        while out.len() < want {
            let m = match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => m.detach(),
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    if until.is_none() {
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(broker(format!(
                            "records {from}..{} are committed but not readable",
                            from + want as u64
                        )));
                    }
                    continue;
                }
                Some(Err(e)) => return Err(broker(e)),
            };
            let seq = seq_of(&m)?;
            let expected = from + out.len() as u64;
            if seq < expected {
                continue;
            }
            if seq != expected {
                return Err(EventLogError::Corrupt {
                    path: self.topic.clone(),
                    at: expected,
                    why: "record numbers skip: a record is missing",
                });
            }
            self.cursor = Some(Cursor {
                seq: seq + 1,
                kafka: m.offset() + 1,
            });
            out.push(Record {
                offset: seq,
                payload: m.payload().unwrap_or_default().to_vec(),
            });
        }
        Ok(out)
    }

    fn assign(&self, at: i64) -> Result<(), EventLogError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, self.partition, Offset::Offset(at))
            .map_err(broker)?;
        self.consumer.assign(&list).map_err(broker)
    }

    /// The next committed record, or `None` at the end of the partition.
    fn poll_one(&self) -> Result<Option<rdkafka::message::OwnedMessage>, EventLogError> {
        match self.consumer.poll(BROKER_TIMEOUT) {
            None => Err(broker("no answer from the broker")),
            Some(Err(KafkaError::PartitionEOF(_))) => Ok(None),
            Some(Err(e)) => Err(broker(e)),
            Some(Ok(m)) => Ok(Some(m.detach())),
        }
    }

    /// Reads the first committed record at Kafka offset `at` or after it.
    fn probe(&self, at: i64) -> Result<Option<(u64, i64)>, EventLogError> {
        self.assign(at)?;
        match self.poll_one()? {
            Some(m) => Ok(Some((seq_of(&m)?, m.offset()))),
            None => Ok(None),
        }
    }

    /// The Kafka offset of record `seq`, or where it will be.
    fn locate(&self, seq: u64) -> Result<i64, EventLogError> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, self.partition, BROKER_TIMEOUT)
            .map_err(broker)?;
        // Kafka offsets only add markers to record numbers: offset ≥ number.
        let mut lo = i64::try_from(seq).map_err(broker)?;
        let mut hi = high;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.probe(mid)? {
                Some((s, kafka)) if s == seq => return Ok(kafka),
                Some((s, kafka)) if s < seq => lo = kafka + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// The last committed record's number and Kafka offset, if any.
    fn last_record(&mut self) -> Result<Option<(u64, i64)>, EventLogError> {
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, self.partition, BROKER_TIMEOUT)
            .map_err(broker)?;
        // Step back past commit and abort markers until a record shows up;
        // failing that, read from the start.
        let mut back = 1;
        loop {
            let at = (high - back).max(low);
            if at >= high {
                return Ok(None);
            }
            self.assign(at)?;
            let mut last = None;
            while let Some(m) = self.poll_one()? {
                last = Some((seq_of(&m)?, m.offset()));
            }
            if last.is_some() || at == low {
                return Ok(last);
            }
            back *= 4;
        }
    }
}

fn writer_loop(
    producer: &BaseProducer,
    config: &KafkaLogConfig,
    rx: &mpsc::Receiver<Request>,
    shared: &Shared,
) {
    while let Ok(first) = rx.recv() {
        // Group commit: everything already waiting goes into this transaction.
        let mut batch = vec![first];
        let mut bytes = batch[0].records.iter().map(Vec::len).sum::<usize>();
        while bytes < MAX_COMMIT_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.records.iter().map(Vec::len).sum::<usize>();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let result = if shared.failed.load(Ordering::SeqCst) {
            Err(EventLogError::Closed)
        } else {
            commit(producer, config, &batch)
        };
        match result {
            Ok(()) => {
                let last = batch.last().expect("one request at least");
                let end = last.first + last.records.len() as u64;
                shared.durable.store(end, Ordering::SeqCst);
                for r in batch {
                    let _ = r.reply.send(Ok(r.first));
                }
            }
            Err(e) => {
                // Nothing after a failed commit may be acknowledged: the
                // numbers it took are gone, and the log refuses from now on.
                shared.failed.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, topic = %config.topic, "event log commit failed");
                for r in batch {
                    let _ = r.reply.send(Err(EventLogError::Broker(e.to_string())));
                }
            }
        }
    }
}

fn commit(
    producer: &BaseProducer,
    config: &KafkaLogConfig,
    batch: &[Request],
) -> Result<(), EventLogError> {
    producer.begin_transaction().map_err(broker)?;
    for request in batch {
        for (seq, payload) in (request.first..).zip(&request.records) {
            let seq_bytes = seq.to_be_bytes();
            let headers = OwnedHeaders::new().insert(Header {
                key: SEQ_HEADER,
                value: Some(&seq_bytes),
            });
            let mut record = BaseRecord::<(), [u8]>::to(&config.topic)
                .partition(config.partition)
                .payload(payload.as_slice())
                .headers(headers);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The client's queue is full: let it deliver, then retry.
                        producer.poll(Duration::from_millis(10));
                        record = r;
                    }
                    Err((e, _)) => {
                        let _ = producer.abort_transaction(BROKER_TIMEOUT);
                        return Err(broker(e));
                    }
                }
            }
        }
    }
    // Wait for the records' acknowledgements in short polls: the client's own
    // flush waits in 100 ms steps, which would be every commit's latency.
    let deadline = std::time::Instant::now() + BROKER_TIMEOUT;
    while producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
    producer.commit_transaction(BROKER_TIMEOUT).map_err(|e| {
        let _ = producer.abort_transaction(BROKER_TIMEOUT);
        broker(e)
    })
}

impl EventLog for KafkaLog {
    fn submit(&self, records: Vec<Vec<u8>>) -> Result<Pending, EventLogError> {
        if let Some(r) = records.iter().find(|r| r.len() > MAX_RECORD_BYTES) {
            return Err(EventLogError::RecordTooLarge(r.len()));
        }
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(EventLogError::Closed);
        }
        let mut queue = self.queue.lock().expect("queue lock");
        let first = queue.next;
        let count = records.len() as u64;
        let (reply, durable) = tokio::sync::oneshot::channel();
        let tx = queue.tx.as_ref().ok_or(EventLogError::Closed)?;
        tx.send(Request {
            first,
            records,
            reply,
        })
        .map_err(|_| EventLogError::Closed)?;
        queue.next += count;
        Ok(Pending::new(first, count, durable))
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, EventLogError> {
        let durable = self.shared.durable.load(Ordering::SeqCst);
        self.reader
            .lock()
            .expect("reader lock")
            .read(from, max_records, Some(durable))
    }

    fn next_offset(&self) -> u64 {
        self.shared.durable.load(Ordering::SeqCst)
    }
}

impl Drop for KafkaLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it has.
        self.queue.lock().expect("queue lock").tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
