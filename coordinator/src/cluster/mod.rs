//! The coordinator cluster on Kafka and Postgres (CLUSTER.md). Built slice by
//! slice; today: `migrate` (topics and the projections' schema).

pub mod migrate;
