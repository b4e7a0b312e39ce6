//! The event log on a Kafka partition passes the same conformance suite as the
//! embedded file log, on both test brokers; a second writer fences the first.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::path::Path;
use std::time::Duration;

use common::services::{Broker, BrokerKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use troop_coordinator::cluster::kafka_log::{KafkaLog, KafkaLogConfig};
use troop_coordinator::eventlog::{EventLog, EventLogError};

/// A one-partition topic for one test, named after its temporary directory.
fn topic_for(brokers: &str, dir: &Path) -> String {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a temporary directory's name")
        .trim_start_matches('.');
    let topic = format!("log-{name}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("admin");
        // Room for the port's largest record and its header.
        let new = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
            .set("max.message.bytes", "2097152");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        // Already there when the same test reopens its log.
        let _ = admin.create_topics([&new], &options).await.expect("create");
    });
    topic
}

fn open_on(kind: BrokerKind, dir: &Path) -> KafkaLog {
    let brokers = Broker::shared(kind);
    let topic = topic_for(brokers, dir);
    KafkaLog::open(KafkaLogConfig {
        brokers: brokers.to_owned(),
        transactional_id: format!("{topic}-writer"),
        topic,
        partition: 0,
    })
    .expect("open")
}

fn open_noida(dir: &Path) -> KafkaLog {
    open_on(BrokerKind::Noida, dir)
}

troop_coordinator::event_log_conformance!(open_noida);

mod tansu {
    use super::*;

    fn open_tansu(dir: &Path) -> KafkaLog {
        open_on(BrokerKind::Tansu, dir)
    }

    troop_coordinator::event_log_conformance!(open_tansu);
}

#[test]
fn a_second_writer_fences_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = open_noida(dir.path());
    first
        .append(vec![b"one".to_vec(), b"two".to_vec()])
        .expect("append");
    // Another node takes the partition over.
    let second = open_noida(dir.path());
    assert_eq!(
        second.next_offset(),
        2,
        "it goes on from what was committed"
    );
    let refused = first.append(vec![b"zombie".to_vec()]);
    assert!(
        matches!(refused, Err(EventLogError::Broker(_))),
        "the fenced writer's append is refused: {refused:?}"
    );
    assert!(
        matches!(
            first.append(vec![b"again".to_vec()]),
            Err(EventLogError::Closed)
        ),
        "and so is everything after it"
    );
    assert_eq!(second.append(vec![b"three".to_vec()]).expect("append"), 2);
    let payloads: Vec<Vec<u8>> = second
        .read(0, 10)
        .expect("read")
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(
        payloads,
        [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()],
        "nothing of the fenced writer is visible"
    );
}
