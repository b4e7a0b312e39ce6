//! Worker and job events on `troop.workers` / `troop.jobs` (noida-db),
//! projected into Postgres: the Kafka adapter passes the same history suite
//! as the embedded one (`embedded_ports.rs`); a record produced twice with one
//! id counts once; a garbled record is read past; a projector that stops and
//! one that starts later go on from the stored offsets without counting
//! anything twice, and of two projectors running at once one projects (and
//! says so on its gauges, with how far behind the topics it is); the
//! projection emptied (RUNBOOK.md) is rebuilt from the topics.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cluster::cluster_with;
use common::services::{Broker, Database};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use troop_coordinator::cluster::history::{self, HistoryProgress, KafkaHistory};
use troop_coordinator::cluster::idle::IdlePause;
use troop_coordinator::config::ClusterConfig;
use troop_coordinator::history::{HistoryLog, WorkerEvent, WorkerRecord, conformance};
use troop_schemas::{JobId, WorkerId};

/// A cluster whose worker and job topics have two partitions each.
async fn cluster(prefix: &str) -> (Database, Broker, ClusterConfig, tokio_postgres::Client) {
    cluster_with(Database::create(), |brokers, postgres| ClusterConfig {
        kafka_brokers: brokers.into(),
        postgres: postgres.into(),
        topic_prefix: prefix.into(),
        ledger_partitions: 1,
        worker_partitions: 2,
        replication_factor: 1,
        ..ClusterConfig::default()
    })
    .await
}

fn projector(config: &ClusterConfig) -> (tokio::task::JoinHandle<()>, Arc<HistoryProgress>) {
    let progress = Arc::new(HistoryProgress::default());
    let task = tokio::spawn(history::project(
        config.clone(),
        IdlePause {
            first: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        Duration::from_millis(200),
        Arc::clone(&progress),
    ));
    (task, progress)
}

/// Waits (bounded) until `what` holds.
async fn until(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !holds() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn started(worker: WorkerId, n: u8) -> WorkerEvent {
    WorkerEvent::JobStarted {
        job: JobId::derive(&[worker.0.as_slice(), &[n]].concat()),
        worker,
        model: "m".into(),
        at_ms: 1_000 + u64::from(n),
    }
}

/// Waits (bounded) until `worker`'s stored record has `jobs_started` starts.
async fn wait_for_starts(log: &KafkaHistory, worker: WorkerId, jobs_started: u64) -> WorkerRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let records = log.records(vec![worker]).await.expect("read");
        if let Some(r) = records
            .get(&worker)
            .filter(|r| r.jobs_started >= jobs_started)
        {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{jobs_started} starts not projected; last read {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The offsets the projector stored, summed over a topic's partitions.
async fn projected_to(client: &tokio_postgres::Client, topic: &str) -> i64 {
    client
        .query_one(
            "select coalesce(sum(next_offset), 0)::int8 from history_offsets where topic = $1",
            &[&topic],
        )
        .await
        .expect("offsets")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_history_passes_the_history_suite() {
    let (_db, _broker, config, _client) = cluster("hs").await;
    let log = KafkaHistory::open(&config).expect("producer");
    let (projecting, _) = projector(&config);
    conformance::run_all(&log, &|test| {
        WorkerId::derive(format!("kafka-{test}").as_bytes())
    })
    .await;
    projecting.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_counts_once_across_duplicates_garbage_and_projector_restarts() {
    let (_db, _broker, config, client) = cluster("hd").await;
    let log = KafkaHistory::open(&config).expect("producer");
    let worker = WorkerId::derive(b"restarts");
    let jobs = config.topic("jobs");

    // Sent twice with one id (a publisher that sent again): one start.
    let id = [7; 16];
    log.send(id, &started(worker, 1)).await.expect("sent");
    log.send(id, &started(worker, 1)).await.expect("sent again");
    // A record that is not a worker event, and one without an event id: both
    // read past.
    let raw: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .create()
        .expect("producer");
    raw.send(
        BaseRecord::<str, [u8]>::to(&jobs)
            .key("x")
            .payload(b"garbage"),
    )
    .expect("queued");
    let unlabelled = started(worker, 9).to_record();
    raw.send(
        BaseRecord::<str, [u8]>::to(&jobs)
            .key("x")
            .payload(&unlabelled),
    )
    .expect("queued");
    raw.flush(Duration::from_secs(10)).expect("delivered");
    log.publish(&started(worker, 2)).await.expect("published");

    let (first, progress) = projector(&config);
    // Its gauges: it leads, and at the start of its term nothing of the five
    // records is projected.
    let lag = || progress.lag_records.load(Ordering::SeqCst);
    until("the first projector measured its lag", || lag() != 0).await;
    assert!(progress.leading.load(Ordering::SeqCst));
    assert_eq!(lag(), 5, "five records past the stored offsets");
    let record = wait_for_starts(&log, worker, 2).await;
    // Everything produced so far is read (five records), and only two count.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while projected_to(&client, &jobs).await < 5 {
        assert!(tokio::time::Instant::now() < deadline, "offsets not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        record.jobs_started, 2,
        "the duplicate and the unlabelled record do not count"
    );
    assert_eq!(record.last_seen_ms, 1_002);
    until("the lag measured again, caught up", || lag() == 0).await;

    // The projector stops; events go on; two projectors start at once: one
    // leads, the other stands by, and the new events count once.
    first.abort();
    for n in 3..=5 {
        log.publish(&started(worker, n)).await.expect("published");
    }
    let ((second, leads_2), (third, leads_3)) = (projector(&config), projector(&config));
    let record = wait_for_starts(&log, worker, 5).await;
    let leading = [leads_2, leads_3].map(|p| p.leading.load(Ordering::SeqCst));
    assert_eq!(
        leading.iter().filter(|l| **l).count(),
        1,
        "one of the two leads: {leading:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = log.records(vec![worker]).await.expect("read");
    assert_eq!(record.jobs_started, 5);
    assert_eq!(again[&worker], record, "nothing counted twice later");
    assert_eq!(projected_to(&client, &jobs).await, 8);
    let applied: i64 = client
        .query_one("select count(*) from history_applied", &[])
        .await
        .expect("ids")
        .get(0);
    assert_eq!(applied, 5, "one id per distinct event");

    // Rebuilt as the runbook says: the three tables emptied in one
    // transaction; the next record makes the projector read both topics
    // from their start again, and every distinct event counts once.
    client
        .batch_execute(
            "begin; delete from worker_history; delete from history_applied;
             delete from history_offsets; commit;",
        )
        .await
        .expect("emptied");
    log.publish(&started(worker, 6)).await.expect("published");
    let rebuilt = wait_for_starts(&log, worker, 6).await;
    assert_eq!(rebuilt.jobs_started, 6, "the five before and the new one");
    assert_eq!(projected_to(&client, &jobs).await, 9);
    second.abort();
    third.abort();
}
