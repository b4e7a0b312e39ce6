//! What the cluster tests share: a migrated database of their own, and the
//! ledger events they build on.
#![allow(dead_code, reason = "each test binary uses a different part")]

use troop_coordinator::cluster::migrate::{connect_postgres, migrate_postgres};
use troop_coordinator::cluster::sequence_log::{Order, OrderRecord};
use troop_coordinator::config::ClusterConfig;
use troop_coordinator::eventlog::Record;
use troop_schemas::event::ModelPrice;
use troop_schemas::{CreditsMicro, Event};

use super::services::Database;

pub fn micro(n: u64) -> CreditsMicro {
    CreditsMicro::new(n).expect("small")
}

/// A price schedule for model "m": holds need one.
pub fn prices(at_ms: u64) -> Event {
    Event::PriceSchedulePublished {
        version: 1,
        fee_bps: 500,
        prices: vec![ModelPrice {
            model: "m".into(),
            input_micro_per_1k: micro(1_000),
            output_micro_per_1k: micro(3_000),
        }],
        at_ms,
    }
}

/// A fresh database with every migration applied, and a client on it.
pub async fn migrated_database() -> (Database, tokio_postgres::Client) {
    let db = Database::create();
    let config = ClusterConfig {
        postgres: db.url.clone(),
        ..ClusterConfig::default()
    };
    let mut client = connect_postgres(&config).await.expect("postgres");
    migrate_postgres(&mut client).await.expect("migrate");
    (db, client)
}

/// The leaves in Postgres, in order, as (partition, record number).
pub async fn leaves(client: &tokio_postgres::Client) -> Vec<(i32, u64)> {
    client
        .query(
            "select partition_id, event_offset from ledger_entries order by leaf_index",
            &[],
        )
        .await
        .expect("leaves")
        .iter()
        .map(|r| {
            (
                r.get(0),
                u64::try_from(r.get::<_, i64>(1)).expect("positive"),
            )
        })
        .collect()
}

/// The order that the sequencer's records (as read from its order log) decide.
pub fn order_of(records: impl IntoIterator<Item = Record>) -> Order {
    let mut order = Order::default();
    for r in records {
        order
            .push(&OrderRecord::decode(&r.payload).expect("decodes"))
            .expect("no gap");
    }
    order
}
