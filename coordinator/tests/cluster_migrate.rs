//! `migrate` against a real Postgres and real Kafka-protocol brokers: the
//! schema and the topics are created once, again is a no-op, nodes migrating
//! at once do not race, and what must not change silently is refused.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::time::Duration;

use common::services::{Broker, BrokerKind, Database};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use troop_coordinator::cluster::migrate::{
    self, MIGRATIONS, MigrateError, Outcome, connect_postgres, migrate_kafka, migrate_postgres,
};
use troop_coordinator::config::ClusterConfig;

fn cluster(db: &Database, broker: &Broker, prefix: &str) -> ClusterConfig {
    ClusterConfig {
        kafka_brokers: broker.brokers.clone(),
        postgres: db.url.clone(),
        topic_prefix: prefix.to_owned(),
        ledger_partitions: 3,
        worker_partitions: 2,
        replication_factor: 1,
        ..ClusterConfig::default()
    }
}

fn partitions(brokers: &str, topic: &str) -> usize {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("client");
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_the_schema_and_the_topics_once() {
    let db = Database::create();
    let broker = Broker::start(BrokerKind::Noida);
    let config = cluster(&db, &broker, "t1");
    let mut client = connect_postgres(&config).await.expect("postgres");

    let first = migrate_postgres(&mut client).await.expect("migrate");
    assert_eq!(first.len(), MIGRATIONS.len());
    assert!(
        first.iter().all(|(_, o)| *o == Outcome::Created),
        "{first:?}"
    );
    let again = migrate_postgres(&mut client).await.expect("migrate again");
    assert!(
        again.iter().all(|(_, o)| *o == Outcome::AlreadyThere),
        "{again:?}"
    );
    // The projections' tables are there, the ledger empty.
    for table in [
        "consumer_offsets",
        "applied_events",
        "ledger_head",
        "ledger_entries",
        "ledger_files",
        "accounts",
        "holds",
        "receipts",
        "api_keys",
        "bans",
        "workers",
        "nodes",
        "partition_owners",
        "worker_presence",
        "worker_registrations",
    ] {
        let n: i64 = client
            .query_one(&format!("select count(*) from {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"))
            .get(0);
        assert_eq!(n, i64::from(table == "ledger_head"), "{table}");
    }
    let size: i64 = client
        .query_one("select tree_size from ledger_head", &[])
        .await
        .expect("head")
        .get(0);
    assert_eq!(size, 0);

    let topics = migrate_kafka(&config).await.expect("topics");
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["t1.ledger", "t1.sequence", "t1.workers", "t1.jobs"]);
    assert!(
        topics.iter().all(|(_, o)| *o == Outcome::Created),
        "{topics:?}"
    );
    let again = migrate_kafka(&config).await.expect("topics again");
    assert!(
        again.iter().all(|(_, o)| *o == Outcome::AlreadyThere),
        "{again:?}"
    );
    let brokers = broker.brokers.clone();
    let counts = tokio::task::spawn_blocking(move || {
        ["t1.ledger", "t1.sequence", "t1.workers", "t1.jobs"].map(|t| partitions(&brokers, t))
    })
    .await
    .expect("metadata");
    assert_eq!(counts, [3, 1, 2, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_migrating_at_once_apply_each_migration_once() {
    let db = Database::create();
    let config = ClusterConfig {
        postgres: db.url.clone(),
        ..ClusterConfig::default()
    };
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                let mut client = connect_postgres(&config).await.expect("postgres");
                migrate_postgres(&mut client).await.expect("migrate")
            })
        })
        .collect();
    let mut created = 0;
    for run in runs {
        created += run
            .await
            .expect("task")
            .iter()
            .filter(|(_, o)| *o == Outcome::Created)
            .count();
    }
    assert_eq!(
        created,
        MIGRATIONS.len(),
        "each migration applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_migration_that_changed_is_refused() {
    let (_db, mut client) = common::cluster::migrated_database().await;
    client
        .execute(
            "update troop_migrations set checksum = '\\x00' where version = 1",
            &[],
        )
        .await
        .expect("tamper");
    let refused = migrate_postgres(&mut client).await;
    assert!(
        matches!(refused, Err(MigrateError::Changed { version: 1, .. })),
        "{refused:?}"
    );
}

/// The ledger's partition count places every account: a configuration that
/// disagrees with the topic is an error, on either broker.
async fn a_ledger_with_other_partitions_is_refused(kind: BrokerKind) {
    let db = Database::create();
    let broker = Broker::start(kind);
    let config = cluster(&db, &broker, "t2");
    migrate_kafka(&config).await.expect("topics");
    let more = ClusterConfig {
        ledger_partitions: 4,
        ..config
    };
    let refused = migrate_kafka(&more).await;
    let Err(MigrateError::Topic { topic, why }) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(topic, "t2.ledger");
    assert!(why.contains("has 3 partitions"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_with_other_partitions_is_refused_on_noida() {
    a_ledger_with_other_partitions_is_refused(BrokerKind::Noida).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_with_other_partitions_is_refused_on_tansu() {
    a_ledger_with_other_partitions_is_refused(BrokerKind::Tansu).await;
}

#[test]
fn the_topics_follow_the_configuration() {
    let specs = migrate::topics(&ClusterConfig {
        topic_prefix: "net".into(),
        ledger_partitions: 24,
        ..ClusterConfig::default()
    });
    let ledger = &specs[0];
    assert_eq!(
        (ledger.name.as_str(), ledger.partitions),
        ("net.ledger", 24)
    );
    assert!(
        ledger.settings.contains(&("retention.ms", "-1".to_owned())),
        "the source of truth is kept forever"
    );
    assert_eq!(specs[1].partitions, 1, "one order for the sequencer");
}
