//! The coordinator cluster on Kafka and Postgres (CLUSTER.md). Built slice by
//! slice; today: `migrate` (topics and the projections' schema), the event
//! log on a Kafka partition, the ledger's sequencer with its order log and its
//! projection into Postgres, `replay` from Kafka, and a node's `/ledger/` and
//! `/metrics` served from the shared services.

pub mod kafka_log;
pub mod ledger_node;
pub mod ledger_store;
pub mod migrate;
pub mod ownership;
pub mod projection;
pub mod replay;
pub mod sequence_log;
pub mod sequencer;
