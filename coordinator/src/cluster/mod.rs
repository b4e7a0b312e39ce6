//! The coordinator cluster on Kafka and Postgres (CLUSTER.md). Built slice by
//! slice; today: `migrate` (topics and the projections' schema) and the event
//! log on a Kafka partition.

pub mod kafka_log;
pub mod ledger_store;
pub mod migrate;
pub mod projection;
pub mod replay;
pub mod sequence_log;
pub mod sequencer;
