//! The in-memory and directory stores pass the shared `LogStore` suite (the
//! cluster's Postgres store runs it in the coordinator's tests).

use std::sync::Arc;

use troop_ledger::store::{DirStore, MemStore};
use troop_ledger::store_conformance::Place;

/// One `MemStore` shared by every open: a "restart" keeps what was written.
#[derive(Default)]
struct Memory(Arc<MemStore>);

impl Place for Memory {
    type Store = Arc<MemStore>;
    fn open(&self) -> Arc<MemStore> {
        Arc::clone(&self.0)
    }
}

struct Dir(tempfile::TempDir);

impl Place for Dir {
    type Store = DirStore;
    fn open(&self) -> DirStore {
        DirStore::open(self.0.path()).expect("open")
    }
}

fn dir() -> Dir {
    Dir(tempfile::tempdir().expect("tempdir"))
}

troop_ledger::log_store_conformance!(dir());

mod memory {
    use super::*;

    troop_ledger::log_store_conformance!(Memory::default());
}
