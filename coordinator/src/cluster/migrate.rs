//! `troop-coordinator migrate`: the cluster's topics and its Postgres schema,
//! created or brought up to date, idempotently. Safe to run from every node at
//! once (an advisory lock serializes the SQL; topic creation is per topic).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::ClusterConfig;

/// Versioned SQL, applied in order, each in its own transaction. A migration
/// is never edited once released: add the next one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "projections",
        include_str!("../../migrations/0001_projections.sql"),
    ),
    (
        2,
        "ledger_publication",
        include_str!("../../migrations/0002_ledger_publication.sql"),
    ),
    (3, "reads", include_str!("../../migrations/0003_reads.sql")),
    (
        4,
        "directory",
        include_str!("../../migrations/0004_directory.sql"),
    ),
    (
        5,
        "presence",
        include_str!("../../migrations/0005_presence.sql"),
    ),
    (
        6,
        "worker_history",
        include_str!("../../migrations/0006_worker_history.sql"),
    ),
    (
        7,
        "bundles_from_entries",
        include_str!("../../migrations/0007_bundles_from_entries.sql"),
    ),
];

/// Held while migrating so that nodes starting together do not race.
const MIGRATION_LOCK: i64 = 0x7472_6f6f_705f_6d67; // "troop_mg"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "migration {version} ({name}) differs from the one applied to this database; migrations are never edited once applied"
    )]
    Changed { version: i32, name: String },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {topic}: {why}")]
    Topic { topic: String, why: String },
}

/// One topic the cluster needs, as `migrate` creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    /// Topic-level settings (`retention.ms`, …).
    pub settings: Vec<(&'static str, String)>,
}

/// The topics of CLUSTER.md for `config`.
pub fn topics(config: &ClusterConfig) -> Vec<TopicSpec> {
    let name = |t: &str| config.topic(t);
    // With copies on several brokers, an acknowledged write (the idempotent
    // producer waits for all in-sync copies) is on at least two of them, so
    // losing one broker loses no event.
    let durable = |retention_ms: String| {
        let mut s = vec![("retention.ms", retention_ms)];
        if config.replication_factor > 1 {
            s.push(("min.insync.replicas", "2".to_owned()));
        }
        s
    };
    let forever = durable("-1".to_owned());
    let days = |d: u64| durable((d * 86_400_000).to_string());
    vec![
        // The source of truth: kept forever.
        TopicSpec {
            name: name("ledger"),
            partitions: config.ledger_partitions,
            settings: forever.clone(),
        },
        // The sequencer's order of the ledger: one partition, forever.
        TopicSpec {
            name: name("sequence"),
            partitions: 1,
            settings: forever,
        },
        // Operational history; its projections keep the totals.
        TopicSpec {
            name: name("workers"),
            partitions: config.worker_partitions,
            settings: days(30),
        },
        TopicSpec {
            name: name("jobs"),
            partitions: config.worker_partitions,
            settings: days(7),
        },
    ]
}

/// What one `migrate` did to one thing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    AlreadyThere,
}

/// Applies every migration not yet applied; returns the versions applied now.
pub async fn migrate_postgres(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<(i32, Outcome)>, MigrateError> {
    // Locked first: even `create table if not exists` races with itself.
    client
        .execute("select pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_migrations(client).await;
    // Unlock whatever happened; the session ends with the client anyway.
    let unlocked = client
        .execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let outcomes = result?;
    unlocked?;
    Ok(outcomes)
}

async fn apply_migrations(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<(i32, Outcome)>, MigrateError> {
    client
        .batch_execute(
            "create table if not exists troop_migrations (
                version integer primary key,
                name text not null,
                checksum bytea not null,
                applied_at timestamptz not null default now()
            )",
        )
        .await?;
    let mut outcomes = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let checksum = blake3::hash(sql.as_bytes()).as_bytes().to_vec();
        let applied = client
            .query_opt(
                "select checksum from troop_migrations where version = $1",
                &[&version],
            )
            .await?;
        if let Some(row) = applied {
            let stored: Vec<u8> = row.get(0);
            if stored != checksum {
                return Err(MigrateError::Changed {
                    version,
                    name: name.to_owned(),
                });
            }
            outcomes.push((version, Outcome::AlreadyThere));
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "insert into troop_migrations (version, name, checksum) values ($1, $2, $3)",
            &[&version, &name, &checksum],
        )
        .await?;
        tx.commit().await?;
        outcomes.push((version, Outcome::Created));
    }
    Ok(outcomes)
}

/// Creates every topic of [`topics`] that is missing. An existing topic must
/// have the partitions the configuration says: the ledger's count fixes which
/// partition (and so which owner) every account has, so a mismatch is an
/// error, never silently "fixed".
pub async fn migrate_kafka(config: &ClusterConfig) -> Result<Vec<(String, Outcome)>, MigrateError> {
    let specs = topics(config);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("client.id", format!("{}-migrate", config.topic_prefix))
        .create()?;
    let replication = i32::try_from(config.replication_factor).unwrap_or(i32::MAX);
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            let partitions = i32::try_from(s.partitions).unwrap_or(i32::MAX);
            s.settings.iter().fold(
                NewTopic::new(&s.name, partitions, TopicReplication::Fixed(replication)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new_topics, &options).await?;
    let mut outcomes = Vec::new();
    for (spec, result) in specs.iter().zip(results) {
        let outcome = match result {
            Ok(_) => Outcome::Created,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Outcome::AlreadyThere,
            Err((topic, code)) => {
                return Err(MigrateError::Topic {
                    topic,
                    why: code.to_string(),
                });
            }
        };
        outcomes.push((spec.name.clone(), outcome));
    }
    // Check what is there now, created or not. Metadata is a blocking call.
    let brokers = config.kafka_brokers.clone();
    let wanted: Vec<(String, u32, bool)> = specs
        .iter()
        .zip(&outcomes)
        .map(|(s, (_, o))| (s.name.clone(), s.partitions, *o == Outcome::Created))
        .collect();
    tokio::task::spawn_blocking(move || check_partitions(&brokers, &wanted))
        .await
        .map_err(|e| MigrateError::Topic {
            topic: "*".into(),
            why: e.to_string(),
        })??;
    Ok(outcomes)
}

/// Each topic's partition count against the configuration's; a topic created
/// just now may take a moment to show all of its partitions.
fn check_partitions(brokers: &str, wanted: &[(String, u32, bool)]) -> Result<(), MigrateError> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for (topic, partitions, created) in wanted {
        let mut seen = 0;
        for _ in 0..if *created { 50 } else { 1 } {
            let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            seen = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len());
            if seen >= *partitions as usize {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if seen != *partitions as usize {
            return Err(MigrateError::Topic {
                topic: topic.clone(),
                why: format!(
                    "has {seen} partitions, the configuration says {partitions}; accounts are placed by partition count, so it is not changed here"
                ),
            });
        }
    }
    Ok(())
}

/// Connects to Postgres as the configuration says; the connection is driven
/// on a task of the current runtime.
pub async fn connect_postgres(
    config: &ClusterConfig,
) -> Result<tokio_postgres::Client, MigrateError> {
    Ok(super::connect(&config.postgres, "migrate").await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_topics_need_two_copies_of_each_write() {
        let setting = |spec: &TopicSpec, key: &str| {
            spec.settings
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        };
        let single = topics(&ClusterConfig::default());
        assert!(
            single
                .iter()
                .all(|t| setting(t, "min.insync.replicas").is_none())
        );
        let three = topics(&ClusterConfig {
            replication_factor: 3,
            ..ClusterConfig::default()
        });
        for t in &three {
            assert_eq!(setting(t, "min.insync.replicas").as_deref(), Some("2"));
        }
        assert_eq!(setting(&three[0], "retention.ms").as_deref(), Some("-1"));
        assert_eq!(
            setting(&three[2], "retention.ms").as_deref(),
            Some("2592000000")
        );
    }
}
