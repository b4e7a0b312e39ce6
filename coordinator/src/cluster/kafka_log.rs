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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::cluster::priority;
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
            topic: cluster.topic("ledger"),
            partition,
            transactional_id: format!("{}-ledger-{partition}", cluster.topic_prefix),
        }
    }

    /// The leading sequencer's order log (`sequence_log`): one partition,
    /// one writer, the next leader fences the last.
    pub fn sequencer(cluster: &crate::config::ClusterConfig) -> Self {
        Self {
            brokers: cluster.kafka_brokers.clone(),
            topic: cluster.topic("sequence"),
            partition: 0,
            transactional_id: format!("{}-sequencer", cluster.topic_prefix),
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

/// Where a partition's next record is: its number and its Kafka offset at
/// the latest (markers may sit in between), as the last read ended or as a
/// lookup found it.
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
    reader: Mutex<TopicReader>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topic", &self.config.topic)
            .field("partition", &self.config.partition)
            .finish()
    }
}

/// What a poll loop does after one message of an open partition.
pub(crate) enum Next {
    /// Keep reading the partition.
    Open,
    /// The partition has what was wanted.
    Close,
    /// The whole read has what was wanted.
    Stop,
}

/// Polls `consumer` (its partitions already assigned) until every partition
/// in `open` is closed or `on_message` stops the read: `on_message` sees each
/// message of an open partition, and reaching a partition's end closes it
/// when `closes_at_end` says so. Gives up after `BROKER_TIMEOUT`: a new
/// consumer's first fetch waits for its connection, but a broker that never
/// answers must not hold a reader for good.
pub(crate) fn poll_partitions<C: rdkafka::consumer::ConsumerContext, E>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    open: &mut BTreeSet<i32>,
    mut closes_at_end: impl FnMut(i32) -> bool,
    mut on_message: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<Next, E>,
    broker: impl Fn(String) -> E,
) -> Result<(), E> {
    let deadline = std::time::Instant::now() + BROKER_TIMEOUT;
    while !open.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(broker(format!(
                "partitions {open:?} of {topic} did not answer in {BROKER_TIMEOUT:?}"
            )));
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if closes_at_end(p) {
                    open.remove(&p);
                }
                continue;
            }
            Some(Err(e)) if passing(&e) => continue,
            Some(Err(e)) => return Err(broker(e.to_string())),
            Some(Ok(m)) => m,
        };
        let p = m.partition();
        if !open.contains(&p) {
            continue;
        }
        match on_message(&m)? {
            Next::Open => {}
            Next::Close => {
                open.remove(&p);
            }
            Next::Stop => return Ok(()),
        }
    }
    Ok(())
}

/// A report that the client lost its broker connections for a moment:
/// librdkafka reconnects on its own, so a read waits on until its deadline
/// instead of failing (seen on tansu in CI: a reopened log's first read got
/// `AllBrokersDown` and the open failed).
fn passing(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure
        )
    )
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
        // At its caller's priority, never lowered here: an owner's log is
        // written on a request's path (a hold is durable before its first
        // byte goes out; lowered, it fell behind the requests at 64 streams,
        // BENCHMARKS.md cluster TTFT run 11), while the sequencer's order
        // log is opened from the background runtime, already lowered.
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("transactional.id", &config.transactional_id)
            .set("client.id", &config.transactional_id)
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
        let mut reader = TopicReader::open(
            &config.brokers,
            &config.topic,
            &format!("{}-tail", config.transactional_id),
        )?;
        let end = reader.end(config.partition)?;
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

/// Reads committed records of a topic's partitions by record number, without
/// writing: one consumer for any number of partitions (the sequencer reads
/// every ledger partition with one, so the broker is asked for all of them in
/// each fetch), assigned only while reading.
pub struct TopicReader {
    topic: String,
    consumer: BaseConsumer<ReaderContext>,
    cursors: HashMap<i32, Cursor>,
}

/// A consumer that reads at positions of its own choosing (the group's
/// offsets are never committed) and is told where a partition ends, with
/// `more` settings; created at background priority, with its threads.
/// `client_id` names its role to the broker (see [`TopicReader::open`]).
pub(crate) fn reader_consumer(
    brokers: &str,
    group_id: &str,
    client_id: &str,
    more: &[(&str, String)],
) -> Result<BaseConsumer<ReaderContext>, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("client.id", client_id)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    for (key, value) in more {
        config.set(*key, value);
    }
    priority::create_in_background(|| config.create_with_context(ReaderContext))
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

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader")
            .field("topic", &self.topic)
            .finish()
    }
}

/// One partition's part of a read.
struct Wanted {
    from: u64,
    /// Records to read at most.
    want: usize,
    /// The records are known committed: an end of partition means they are
    /// not visible yet, not that there are no more.
    committed: bool,
}

impl TopicReader {
    /// `client_id` is what the broker sees in every request of this reader:
    /// each of a node's Kafka clients names its role (`troop-sequencer-feed`,
    /// `troop-ledger-3-tail`, …) so that a broker's per-client figures, logs
    /// and quotas tell them apart (CLUSTER.md, "Kafka clients").
    pub fn open(brokers: &str, topic: &str, client_id: &str) -> Result<Self, EventLogError> {
        let consumer = reader_consumer(
            brokers,
            &format!("troop-reader-{topic}"),
            client_id,
            &[
                ("isolation.level", "read_committed".into()),
                (
                    "fetch.message.max.bytes",
                    (2 * MAX_RECORD_BYTES).to_string(),
                ),
            ],
        )
        .map_err(broker)?;
        Ok(Self {
            topic: topic.to_owned(),
            consumer,
            cursors: HashMap::new(),
        })
    }

    /// The number the next committed record of `partition` will have.
    pub fn end(&mut self, partition: i32) -> Result<u64, EventLogError> {
        let last = self.last_record(partition);
        self.consumer.unassign().map_err(broker)?;
        Ok(last?.map_or(0, |(seq, _)| seq + 1))
    }

    /// Up to `max_records` records of `partition` from number `from` on;
    /// records below `until` are known committed and are waited for.
    pub fn read(
        &mut self,
        partition: i32,
        from: u64,
        max_records: usize,
        until: u64,
    ) -> Result<Vec<Record>, EventLogError> {
        let want = usize::try_from(until.saturating_sub(from))
            .unwrap_or(usize::MAX)
            .min(max_records);
        let plan = BTreeMap::from([(
            partition,
            Wanted {
                from,
                want,
                committed: true,
            },
        )]);
        Ok(self.fetch(&plan)?.remove(&partition).unwrap_or_default())
    }

    /// Up to `max_per_partition` records of each partition in `from` (its
    /// next record number), up to what is visible now.
    pub fn read_visible(
        &mut self,
        from: &BTreeMap<i32, u64>,
        max_per_partition: usize,
    ) -> Result<BTreeMap<i32, Vec<Record>>, EventLogError> {
        let plan = from
            .iter()
            .map(|(p, from)| {
                let wanted = Wanted {
                    from: *from,
                    want: max_per_partition,
                    committed: false,
                };
                (*p, wanted)
            })
            .collect();
        self.fetch(&plan)
    }

    fn fetch(
        &mut self,
        plan: &BTreeMap<i32, Wanted>,
    ) -> Result<BTreeMap<i32, Vec<Record>>, EventLogError> {
        let mut out: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
        let mut list = TopicPartitionList::new();
        for (p, w) in plan.iter().filter(|(_, w)| w.want > 0) {
            let at = match self.cursors.get(p) {
                Some(c) if c.seq == w.from => c.kafka,
                _ => {
                    // Kept whatever the read finds (a record read moves it
                    // on): an idle reader of an empty partition asked the
                    // broker for its offsets on every round without it.
                    let kafka = self.locate(*p, w.from)?;
                    self.cursors.insert(*p, Cursor { seq: w.from, kafka });
                    kafka
                }
            };
            list.add_partition_offset(&self.topic, *p, Offset::Offset(at))
                .map_err(broker)?;
            out.insert(*p, Vec::with_capacity(w.want.min(4096)));
        }
        if out.is_empty() {
            return Ok(out);
        }
        self.consumer.assign(&list).map_err(broker)?;
        let read = self.fetch_assigned(plan, &mut out);
        // Assigned only while reading: librdkafka keeps fetching an assigned
        // partition, and against a broker that answers an empty fetch at once
        // (noida-db does) that is a busy loop on both sides between reads.
        let released = self.consumer.unassign().map_err(broker);
        read?;
        released?;
        Ok(out)
    }

    fn fetch_assigned(
        &mut self,
        plan: &BTreeMap<i32, Wanted>,
        out: &mut BTreeMap<i32, Vec<Record>>,
    ) -> Result<(), EventLogError> {
        let mut open: BTreeSet<i32> = out.keys().copied().collect();
        let topic = self.topic.as_str();
        let cursors = &mut self.cursors;
        // Committed records may take a moment to become visible to a reader
        // (the commit marker goes out after the commit returns): a partition
        // whose records are known committed is not closed by reaching its end.
        poll_partitions(
            &self.consumer,
            topic,
            &mut open,
            |p| plan.get(&p).is_some_and(|w| !w.committed),
            |m| {
                let p = m.partition();
                let (Some(w), Some(records)) = (plan.get(&p), out.get_mut(&p)) else {
                    return Ok(Next::Open);
                };
                let seq = seq_of(m)?;
                let expected = w.from + records.len() as u64;
                if seq < expected {
                    return Ok(Next::Open);
                }
                if seq != expected {
                    return Err(EventLogError::Corrupt {
                        path: format!("{topic}/{p}"),
                        at: expected,
                        why: "record numbers skip: a record is missing",
                    });
                }
                cursors.insert(
                    p,
                    Cursor {
                        seq: seq + 1,
                        kafka: m.offset() + 1,
                    },
                );
                records.push(Record {
                    offset: seq,
                    payload: m.payload().unwrap_or_default().to_vec(),
                });
                Ok(if records.len() >= w.want {
                    Next::Close
                } else {
                    Next::Open
                })
            },
            broker,
        )
    }

    fn assign_one(&self, partition: i32, at: i64) -> Result<(), EventLogError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, Offset::Offset(at))
            .map_err(broker)?;
        self.consumer.assign(&list).map_err(broker)
    }

    /// The next committed record, or `None` at the end of the partition.
    fn poll_one(&self) -> Result<Option<rdkafka::message::OwnedMessage>, EventLogError> {
        let deadline = std::time::Instant::now() + BROKER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            return match self.consumer.poll(left) {
                None => Err(broker("no answer from the broker")),
                Some(Err(KafkaError::PartitionEOF(_))) => Ok(None),
                Some(Err(e)) if passing(&e) => continue,
                Some(Err(e)) => Err(broker(e)),
                Some(Ok(m)) => Ok(Some(m.detach())),
            };
        }
    }

    /// Reads the first committed record at Kafka offset `at` or after it.
    fn probe(&self, partition: i32, at: i64) -> Result<Option<(u64, i64)>, EventLogError> {
        self.assign_one(partition, at)?;
        match self.poll_one()? {
            Some(m) => Ok(Some((seq_of(&m)?, m.offset()))),
            None => Ok(None),
        }
    }

    /// The Kafka offset of record `seq`, or where it will be.
    fn locate(&self, partition: i32, seq: u64) -> Result<i64, EventLogError> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT)
            .map_err(broker)?;
        // Kafka offsets only add markers to record numbers: offset ≥ number.
        let mut lo = i64::try_from(seq).map_err(broker)?;
        let mut hi = high;
        // First at the lowest place it can be: exact when no marker precedes
        // it (a partition read from its start), one probe of many otherwise.
        let mut mid = lo;
        while lo < hi {
            match self.probe(partition, mid)? {
                Some((s, kafka)) if s == seq => return Ok(kafka),
                Some((s, kafka)) if s < seq => lo = kafka + 1,
                _ => hi = mid,
            }
            mid = lo + (hi - lo) / 2;
        }
        Ok(lo)
    }

    /// The last committed record's number and Kafka offset, if any.
    fn last_record(&mut self, partition: i32) -> Result<Option<(u64, i64)>, EventLogError> {
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT)
            .map_err(broker)?;
        // Step back past commit and abort markers until a record shows up;
        // failing that, read from the start.
        let mut back = 1;
        loop {
            let at = (high - back).max(low);
            if at >= high {
                return Ok(None);
            }
            self.assign_one(partition, at)?;
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
        self.reader.lock().expect("reader lock").read(
            self.config.partition,
            from,
            max_records,
            durable,
        )
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
