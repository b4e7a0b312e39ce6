//! The ledger's tiles and checkpoints in Postgres pass the same `LogStore`
//! suite as the embedded directory store.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use common::services::Database;
use troop_coordinator::cluster::ledger_store::PgLogStore;
use troop_ledger::store_conformance::Place;

/// A migrated database of its own; every open is a new connection to it.
struct Postgres {
    runtime: tokio::runtime::Runtime,
    db: Database,
}

impl Place for Postgres {
    type Store = PgLogStore;
    fn open(&self) -> PgLogStore {
        self.runtime
            .block_on(PgLogStore::connect(&self.db.url))
            .expect("connect")
    }
}

fn postgres() -> Postgres {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (db, _client) = runtime.block_on(common::cluster::migrated_database());
    Postgres { runtime, db }
}

troop_ledger::log_store_conformance!(postgres());
