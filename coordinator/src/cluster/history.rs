//! Worker and job events on their topics, projected into Postgres: the
//! cluster's adapter of the [`HistoryLog`] port (CLUSTER.md, "Worker
//! history").
//!
//! Every node produces with an idempotent producer (a record is acknowledged
//! once every in-sync copy has it): epoch summaries to `troop.workers` keyed by
//! worker, job starts and failures to `troop.jobs` keyed by job, each with a
//! random event id in the `troop-event-id` header. One node at a time projects
//! them (a Postgres advisory lock, as the sequencer leads): it reads both
//! topics from the offsets in `history_offsets` and applies a round in one
//! transaction — the new ids into `history_applied`, what their events fold to
//! added to `worker_history`, the offsets moved by a compare-and-swap from
//! where the round read. A crash before the commit has the round read again
//! from the stored offsets; a record produced twice has one id and counts
//! once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{Offset, TopicPartitionList};
use troop_schemas::WorkerId;

use super::idle::IdlePause;
use super::kafka_log::{Next, ReaderContext, poll_partitions, reader_consumer};
use super::{Reconnecting, blocking};
use crate::cluster::priority;
use crate::config::ClusterConfig;
use crate::history::{
    HistoryError, HistoryLog, MAX_RECORDS_READ, Published, Records, WorkerEvent, WorkerHistory,
    WorkerRecord,
};

/// The header holding a record's event id.
pub const EVENT_ID_HEADER: &str = "troop-event-id";
/// Held by the projecting node's connection.
pub const HISTORY_LOCK: i64 = 0x7472_6f6f_705f_6869; // "troop_hi"
/// Most records one round reads from each topic.
const ROUND_RECORDS: usize = 4096;
/// Largest event a node produces: a heartbeat summary names a worker's models
/// and GPUs, each list bounded by the worker protocol.
const MAX_EVENT_BYTES: usize = 64 << 10;
/// How long a read of the topics may take before the round gives up.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// Applied ids are kept this long: longer than either topic keeps records
/// (30 days), so no record can come back after its id is gone.
const KEEP_APPLIED_DAYS: i32 = 31;
/// How often the projector prunes applied ids, and how many at most a time.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_MAX_ROWS: i64 = 100_000;
/// How often the leading projector measures how far behind the topics it is.
const MEASURE_LAG_EVERY: Duration = Duration::from_secs(5);

/// What a node's projector shows on `/metrics` (`troop_history_*`), so that
/// an alert sees a cluster where no node projects, or one that falls behind.
#[derive(Debug, Default)]
pub struct HistoryProgress {
    /// True while this node's projector leads.
    pub leading: AtomicBool,
    /// Records of both topics past the stored offsets, as the leader last
    /// measured them (at the start of its term, then every
    /// `MEASURE_LAG_EVERY`); 0 on a node that does not lead.
    pub lag_records: AtomicU64,
}

/// An event's id: the same on every delivery of the record.
pub type EventId = [u8; 16];

fn broker(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Broker(e.to_string())
}

/// Hands each record's acknowledgement (or failure) to its publisher, and
/// logs a failure whether or not anyone waits for it.
#[derive(Debug)]
struct Delivery;

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = Box<tokio::sync::oneshot::Sender<Result<(), String>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, reply: Self::DeliveryOpaque) {
        let outcome = result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "a worker event was not delivered");
        }
        let _ = reply.send(outcome);
    }
}

/// The cluster's [`HistoryLog`]: produces to the topics, reads the
/// projection from Postgres.
pub struct KafkaHistory {
    producer: ThreadedProducer<Delivery>,
    workers_topic: String,
    jobs_topic: String,
    pg: Arc<Reconnecting>,
}

impl std::fmt::Debug for KafkaHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaHistory")
            .field("workers_topic", &self.workers_topic)
            .field("jobs_topic", &self.jobs_topic)
            .finish_non_exhaustive()
    }
}

impl KafkaHistory {
    pub fn open(cluster: &ClusterConfig) -> Result<Self, HistoryError> {
        let producer = priority::create_in_background(|| {
            ClientConfig::new()
                .set("bootstrap.servers", &cluster.kafka_brokers)
                .set("client.id", format!("{}-history", cluster.topic_prefix))
                // Implies acks=all: acknowledged once every in-sync copy has it,
                // and a retried send is written once.
                .set("enable.idempotence", "true")
                // Nothing waits on these on a request's path: a few ms of
                // batching saves the broker a request per event.
                .set("linger.ms", "5")
                // Java's partitioner, so other clients key these topics alike.
                .set("partitioner", "murmur2_random")
                // The queue is bounded: past it an event is refused (and logged)
                // rather than held in memory through a long broker outage.
                .set("queue.buffering.max.messages", "100000")
                .set("message.timeout.ms", "120000")
                .create_with_context(Delivery)
        })
        .map_err(broker)?;
        Ok(Self {
            producer,
            workers_topic: cluster.topic("workers"),
            jobs_topic: cluster.topic("jobs"),
            pg: Arc::new(Reconnecting::new(&cluster.postgres, "worker history")),
        })
    }

    /// Produces `event` with the id `id`: [`HistoryLog::publish`] draws a new
    /// one each time; a caller sending an event again sends the same id.
    pub fn send(&self, id: EventId, event: &WorkerEvent) -> Published {
        let (topic, key) = match event {
            WorkerEvent::Heartbeats(s) => (&self.workers_topic, s.worker.to_string()),
            WorkerEvent::JobStarted { job, .. } | WorkerEvent::JobFailed { job, .. } => {
                (&self.jobs_topic, job.to_string())
            }
        };
        let payload = event.to_record();
        if payload.len() > MAX_EVENT_BYTES {
            let why = format!("a worker event of {} bytes", payload.len());
            return Box::pin(std::future::ready(Err(HistoryError::Broker(why))));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let headers = OwnedHeaders::new().insert(Header {
            key: EVENT_ID_HEADER,
            value: Some(&id[..]),
        });
        let record = BaseRecord::<str, [u8], _>::with_opaque_to(topic, Box::new(tx))
            .key(key.as_str())
            .payload(payload.as_slice())
            .headers(headers);
        match self.producer.send(record) {
            Ok(()) => Box::pin(async move {
                rx.await
                    .map_err(|_| broker("the producer stopped"))?
                    .map_err(HistoryError::Broker)
            }),
            Err((e, _)) => Box::pin(std::future::ready(Err(broker(e)))),
        }
    }
}

impl Drop for KafkaHistory {
    fn drop(&mut self) {
        // What is queued still goes out when the node stops cleanly.
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "worker events still queued at shutdown");
        }
    }
}

impl HistoryLog for KafkaHistory {
    fn publish(&self, event: &WorkerEvent) -> Published {
        self.send(crate::server::random::<16>(), event)
    }

    fn records(&self, workers: Vec<WorkerId>) -> Records {
        if workers.len() > MAX_RECORDS_READ {
            return Box::pin(std::future::ready(Err(HistoryError::TooMany(
                workers.len(),
            ))));
        }
        let pg = Arc::clone(&self.pg);
        Box::pin(async move {
            let client = pg.get().await?;
            read_records(&*client, &workers, false).await
        })
    }
}

/// The stored records of `workers`, locked for the transaction when `lock`.
async fn read_records(
    client: &impl tokio_postgres::GenericClient,
    workers: &[WorkerId],
    lock: bool,
) -> Result<HashMap<WorkerId, WorkerRecord>, HistoryError> {
    let names: Vec<String> = workers.iter().map(ToString::to_string).collect();
    let sql = if lock {
        "select worker, jobs_started, jobs_failed, epochs, beats, last_seen_ms
         from worker_history where worker = any($1) order by worker for update"
    } else {
        "select worker, jobs_started, jobs_failed, epochs, beats, last_seen_ms
         from worker_history where worker = any($1)"
    };
    let stored = |v: i64| {
        u64::try_from(v).map_err(|_| HistoryError::Stored(format!("a negative count {v}")))
    };
    client
        .query(sql, &[&names])
        .await?
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            let worker = name
                .parse()
                .map_err(|e| HistoryError::Stored(format!("worker {name}: {e}")))?;
            let record = WorkerRecord {
                jobs_started: stored(row.get(1))?,
                jobs_failed: stored(row.get(2))?,
                epochs: stored(row.get(3))?,
                beats: stored(row.get(4))?,
                last_seen_ms: stored(row.get(5))?,
            };
            Ok((worker, record))
        })
        .collect()
}

/// One record as the projector read it.
#[derive(Debug, Clone)]
struct Consumed {
    id: EventId,
    event: WorkerEvent,
}

/// Where each topic partition is read to: (topic, partition) → next offset.
type Positions = BTreeMap<(String, i32), i64>;

/// What one round read: the events in the order read (each partition's in
/// its order), and where every partition it read is now.
#[derive(Debug, Default)]
struct Round {
    events: Vec<Consumed>,
    read_to: Positions,
}

/// Reads one topic's partitions from given offsets, assigned only while
/// reading (as `kafka_log::TopicReader`: an assigned partition is fetched
/// continuously, a busy loop against a broker that answers empty fetches at
/// once). One consumer per topic, so that an end-of-partition event, which
/// names only the partition, is unambiguous.
struct TopicTail {
    topic: String,
    consumer: BaseConsumer<ReaderContext>,
}

impl TopicTail {
    fn open(brokers: &str, topic: &str) -> Result<Self, HistoryError> {
        let consumer = reader_consumer(
            brokers,
            &format!("troop-history-{topic}"),
            &format!("{topic}-tail"),
            // Offsets past the topic's retention start again at its oldest.
            &[("auto.offset.reset", "earliest".into())],
        )
        .map_err(broker)?;
        Ok(Self {
            topic: topic.to_owned(),
            consumer,
        })
    }

    /// Records past `from` (partition → offset): the broker's high
    /// watermark of each partition minus where the projection stands.
    fn lag(&self, from: &BTreeMap<i32, i64>) -> Result<u64, HistoryError> {
        let mut lag = 0u64;
        for (p, at) in from {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&self.topic, *p, BROKER_TIMEOUT)
                .map_err(broker)?;
            lag += u64::try_from(high.saturating_sub(*at)).unwrap_or(0);
        }
        Ok(lag)
    }

    /// Up to `max` records from `from` (partition → offset), into `round`.
    fn read(
        &self,
        from: &BTreeMap<i32, i64>,
        max: usize,
        round: &mut Round,
    ) -> Result<(), HistoryError> {
        let mut list = TopicPartitionList::new();
        for (p, at) in from {
            list.add_partition_offset(&self.topic, *p, Offset::Offset(*at))
                .map_err(broker)?;
        }
        self.consumer.assign(&list).map_err(broker)?;
        let mut open: BTreeSet<i32> = from.keys().copied().collect();
        let mut taken = 0;
        let read = poll_partitions(
            &self.consumer,
            &self.topic,
            &mut open,
            |_| true,
            |m| {
                let p = m.partition();
                taken += 1;
                round
                    .read_to
                    .insert((self.topic.clone(), p), m.offset() + 1);
                match decode(m) {
                    Ok(c) => round.events.push(c),
                    // Not one of ours, or garbled: read past, never stuck on it.
                    Err(why) => tracing::warn!(
                        topic = %self.topic, partition = p, offset = m.offset(), why,
                        "a worker-history record skipped"
                    ),
                }
                Ok(if taken >= max { Next::Stop } else { Next::Open })
            },
            broker,
        );
        let released = self.consumer.unassign().map_err(broker);
        read?;
        released
    }
}

fn decode(m: &impl rdkafka::message::Message) -> Result<Consumed, String> {
    let id = m
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == EVENT_ID_HEADER))
        .and_then(|h| h.value)
        .and_then(|v| EventId::try_from(v).ok())
        .ok_or("no 16-byte troop-event-id header")?;
    let event = WorkerEvent::from_record(m.payload().unwrap_or_default())?;
    Ok(Consumed { id, event })
}

/// Projects worker and job events from the topics into Postgres whenever this
/// node holds the projector's lock, pausing by `idle` after rounds that found
/// nothing; a standby looks again every `standby_retry`. Runs until aborted.
pub async fn project(
    cluster: ClusterConfig,
    idle: IdlePause,
    standby_retry: Duration,
    progress: Arc<HistoryProgress>,
) {
    loop {
        let term = lead(&cluster, idle, &progress).await;
        progress.leading.store(false, Ordering::SeqCst);
        progress.lag_records.store(0, Ordering::SeqCst);
        if let Err(e) = term {
            tracing::warn!(error = %e, "the history projector stopped leading; will try again");
        }
        tokio::time::sleep(standby_retry).await;
    }
}

/// One term: returns at once when another node projects, otherwise runs
/// until something fails (a lost connection, a broker error, a fence).
async fn lead(
    cluster: &ClusterConfig,
    idle: IdlePause,
    progress: &HistoryProgress,
) -> Result<(), HistoryError> {
    let Some((mut client, mut lost)) =
        super::try_lead(&cluster.postgres, HISTORY_LOCK, "history projector").await?
    else {
        return Ok(());
    };
    progress.leading.store(true, Ordering::SeqCst);
    let topics = [cluster.topic("workers"), cluster.topic("jobs")];
    let partitions = i32::try_from(cluster.worker_partitions)
        .map_err(|_| broker("worker_partitions out of range"))?;
    // Every partition has its row from the first term on, so that each round
    // moves offsets by a compare-and-swap.
    client
        .execute(
            "insert into history_offsets (topic, partition, next_offset)
             select t, p, 0 from unnest($1::text[]) t, generate_series(0, $2 - 1) p
             on conflict do nothing",
            &[&topics.as_slice(), &partitions],
        )
        .await?;
    let mut positions: Positions = client
        .query(
            "select topic, partition, next_offset from history_offsets where topic = any($1)",
            &[&topics.as_slice()],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let brokers = cluster.kafka_brokers.clone();
    let mut tails = blocking(move || -> Result<Vec<TopicTail>, HistoryError> {
        topics
            .iter()
            .map(|t| TopicTail::open(&brokers, t))
            .collect()
    })
    .await??;
    tracing::info!("projecting worker history");
    let mut pruned = Instant::now();
    let mut measured: Option<Instant> = None;
    let mut empty_rounds = 0u32;
    loop {
        if lost.try_recv().is_ok() {
            return Err(broker("the projector's Postgres connection ended"));
        }
        let from = positions.clone();
        let measure = measured.is_none_or(|at| at.elapsed() >= MEASURE_LAG_EVERY);
        if measure {
            measured = Some(Instant::now());
        }
        let (back, lag, round) = blocking(move || {
            // Measured before the round reads, from the positions it reads from.
            let lag = measure.then(|| lag_of(&tails, &from));
            let round = read_round(&tails, &from);
            (tails, lag, round)
        })
        .await?;
        tails = back;
        if let Some(lag) = lag {
            progress.lag_records.store(lag?, Ordering::SeqCst);
        }
        let round = round?;
        if round.read_to.is_empty() {
            empty_rounds = empty_rounds.saturating_add(1);
            tokio::time::sleep(idle.after(empty_rounds)).await;
        } else {
            empty_rounds = 0;
            apply(&mut client, &positions, &round).await?;
            positions.extend(round.read_to);
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            prune(&client).await?;
        }
    }
}

impl From<super::BlockingFailed> for HistoryError {
    fn from(e: super::BlockingFailed) -> Self {
        broker(format!("a blocking read: {}", e.0))
    }
}

/// Records of both topics past `positions`.
fn lag_of(tails: &[TopicTail], positions: &Positions) -> Result<u64, HistoryError> {
    let mut lag = 0;
    for tail in tails {
        lag += tail.lag(&of_topic(positions, &tail.topic))?;
    }
    Ok(lag)
}

/// The positions of `topic`'s partitions.
fn of_topic(positions: &Positions, topic: &str) -> BTreeMap<i32, i64> {
    positions
        .iter()
        .filter(|((t, _), _)| t == topic)
        .map(|((_, p), at)| (*p, *at))
        .collect()
}

/// Reads every partition of both topics from `positions`.
fn read_round(tails: &[TopicTail], positions: &Positions) -> Result<Round, HistoryError> {
    let mut round = Round::default();
    for tail in tails {
        tail.read(&of_topic(positions, &tail.topic), ROUND_RECORDS, &mut round)?;
    }
    Ok(round)
}

/// Applies one round in one transaction: offsets moved from where the round
/// read (or nothing is applied), ids not applied before folded in.
async fn apply(
    client: &mut tokio_postgres::Client,
    positions: &Positions,
    round: &Round,
) -> Result<(), HistoryError> {
    let tx = client.transaction().await?;
    for ((topic, p), to) in &round.read_to {
        let was = positions.get(&(topic.clone(), *p)).copied().unwrap_or(0);
        let moved = tx
            .execute(
                "update history_offsets set next_offset = $4
                 where topic = $1 and partition = $2 and next_offset = $3",
                &[topic, p, &was, to],
            )
            .await?;
        if moved != 1 {
            return Err(HistoryError::Stored(format!(
                "{topic}/{p} is no longer at offset {was}: another projector moved it"
            )));
        }
    }
    let ids: Vec<&[u8]> = round.events.iter().map(|c| &c.id[..]).collect();
    let mut fresh: HashSet<EventId> = tx
        .query(
            "insert into history_applied (event_id) select unnest($1::bytea[])
             on conflict do nothing returning event_id",
            &[&ids],
        )
        .await?
        .iter()
        .filter_map(|r| EventId::try_from(r.get::<_, &[u8]>(0)).ok())
        .collect();
    // Each id once, the first time it appears (a duplicate within the round
    // finds its id taken).
    let mut folded = WorkerHistory::default();
    for c in &round.events {
        if fresh.remove(&c.id) {
            folded.apply(&c.event);
        }
    }
    let workers: Vec<WorkerId> = folded.iter().map(|(w, _)| *w).collect();
    if !workers.is_empty() {
        // Added up here, by the domain's own rule, not in SQL.
        let mut records = read_records(&tx, &workers, true).await?;
        for (w, more) in folded.iter() {
            records.entry(*w).or_default().add(more);
        }
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut columns: [Vec<i64>; 5] = Default::default();
        let mut names = Vec::with_capacity(records.len());
        for (w, r) in &records {
            names.push(w.to_string());
            for (column, v) in columns.iter_mut().zip([
                r.jobs_started,
                r.jobs_failed,
                r.epochs,
                r.beats,
                r.last_seen_ms,
            ]) {
                column.push(count(v));
            }
        }
        let [started, failed, epochs, beats, seen] = &columns;
        tx.execute(
            "insert into worker_history (worker, jobs_started, jobs_failed, epochs, beats, last_seen_ms)
             select * from unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
             on conflict (worker) do update set
                 jobs_started = excluded.jobs_started, jobs_failed = excluded.jobs_failed,
                 epochs = excluded.epochs, beats = excluded.beats, last_seen_ms = excluded.last_seen_ms",
            &[&names, started, failed, epochs, beats, seen],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Forgets applied ids older than any record the topics still keep.
async fn prune(client: &tokio_postgres::Client) -> Result<(), HistoryError> {
    client
        .execute(
            "delete from history_applied where event_id in (
                 select event_id from history_applied
                 where applied_at < now() - make_interval(days => $1) limit $2)",
            &[&KEEP_APPLIED_DAYS, &PRUNE_MAX_ROWS],
        )
        .await?;
    Ok(())
}

/// How a node runs the projector: as a task beside its other work.
pub fn spawn(
    cluster: &ClusterConfig,
    progress: Arc<HistoryProgress>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(project(
        cluster.clone(),
        // Worker and job records feed listings and metrics, not a request's
        // path: a second late after a quiet spell is fine.
        IdlePause {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1_600),
        },
        Duration::from_secs(1),
        progress,
    ))
}
