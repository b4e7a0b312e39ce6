//! The ledger's tiles and checkpoints in Postgres pass the same `LogStore`
//! suite as the embedded directory store; its entry bundles are built from
//! `ledger_entries`, where the suite's entries are committed first, as the
//! sequencer commits them.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use common::services::Database;
use troop_coordinator::cluster::ledger_store::PgLogStore;
use troop_ledger::store_conformance::Place;

/// A migrated database of its own; every open is a new connection to it.
struct Postgres {
    runtime: tokio::runtime::Runtime,
    db: Database,
    client: tokio_postgres::Client,
}

impl Place for Postgres {
    type Store = PgLogStore;
    fn open(&self) -> PgLogStore {
        self.runtime
            .block_on(PgLogStore::connect(&self.db.url))
            .expect("connect")
    }

    fn sequenced(&self, index: u64, entry: &[u8]) {
        let index = i64::try_from(index).expect("small");
        // Appended again after a crash: the committed row is already there.
        self.runtime
            .block_on(self.client.execute(
                "insert into ledger_entries (leaf_index, partition_id, event_offset, entry)
                 values ($1, 0, $1, $2) on conflict do nothing",
                &[&index, &entry],
            ))
            .expect("commit the entry");
    }
}

fn postgres() -> Postgres {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (db, client) = runtime.block_on(common::cluster::migrated_database());
    Postgres {
        runtime,
        db,
        client,
    }
}

troop_ledger::log_store_conformance!(postgres());
