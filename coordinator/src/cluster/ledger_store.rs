//! The ledger's tiles, bundles and signed checkpoint in Postgres: the cluster's
//! [`LogStore`], so that every node serves `/ledger/` from the same place.
//!
//! The writer ([`troop_ledger::LogWriter`]) is synchronous log arithmetic; this
//! store answers it from a blocking thread by driving its own connection on
//! the runtime it was opened on. Writes wait in memory until `sync` (one
//! statement for all of them); the checkpoint is the commit point and only
//! moves forward, so a sequencer that lost its lease cannot publish an older
//! tree over a newer one.
//!
//! Entry bundles are not stored: `ledger_entries` holds every entry, committed
//! before the writer is given it, and a bundle is built from its rows when
//! read. Storing bundles too wrote every entry twice.

use std::collections::BTreeMap;
use std::sync::Mutex;

use troop_ledger::store::{CHECKPOINT_PATH, LogStore, StoreError, check_path, checkpoint_size};
use troop_ledger::tile::{self, TILE_WIDTH, TileId, TileSource};

/// Reads one published file (`checkpoint`, a hash tile or an entry bundle)
/// for `/ledger/`.
pub async fn read_file(
    client: &tokio_postgres::Client,
    path: &str,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    if let Some(bundle) = TileId::parse(path).filter(|id| id.level.is_none()) {
        return read_bundle(client, bundle).await;
    }
    let row = if path == CHECKPOINT_PATH {
        client
            .query_opt("select note from ledger_checkpoint", &[])
            .await?
    } else {
        client
            .query_opt("select body from ledger_files where path = $1", &[&path])
            .await?
    };
    Ok(row.map(|r| r.get(0)))
}

/// The bundle built from `ledger_entries`; None until every entry it holds
/// is there.
async fn read_bundle(
    client: &tokio_postgres::Client,
    bundle: TileId,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    let range = bundle.index.checked_mul(TILE_WIDTH).and_then(|from| {
        let to = from.checked_add(u64::from(bundle.width))?;
        Some((i64::try_from(from).ok()?, i64::try_from(to).ok()?))
    });
    let Some((from, to)) = range else {
        return Ok(None);
    };
    let rows = entries_between(client, from, to).await?;
    if rows.len() != usize::from(bundle.width) {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = rows.iter().map(|r| r.get(1)).collect();
    Ok(Some(tile::encode_bundle(entries)))
}

/// Rows (leaf index, entry) of the sequenced entries in `from..to`, in order.
pub(crate) async fn entries_between(
    client: &tokio_postgres::Client,
    from: i64,
    to: i64,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    client
        .query(
            "select leaf_index, entry from ledger_entries
             where leaf_index >= $1 and leaf_index < $2 order by leaf_index",
            &[&from, &to],
        )
        .await
}

pub struct PgLogStore {
    client: tokio_postgres::Client,
    runtime: tokio::runtime::Handle,
    /// Written, not yet synced: the writer reads its own writes from here.
    pending: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for PgLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLogStore").finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("postgres: {e}"))
}

impl PgLogStore {
    /// Opens a connection of its own (libpq string), driven on the current
    /// runtime. Use the store from blocking threads only (`spawn_blocking`,
    /// rayon, a plain thread): every call waits for Postgres.
    pub async fn connect(postgres: &str) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            client: super::connect(postgres, "ledger store").await?,
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::new(BTreeMap::new()),
        })
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }
}

impl TileSource for PgLogStore {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        check_path(path).map_err(|e| e.to_string())?;
        if let Some(bytes) = self.pending.lock().map_err(|e| e.to_string())?.get(path) {
            return Ok(Some(bytes.clone()));
        }
        self.block_on(read_file(&self.client, path))
            .map_err(|e| format!("{path}: postgres: {e}"))
    }
}

impl LogStore for PgLogStore {
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check_path(path)?;
        if path == CHECKPOINT_PATH {
            return Err(StoreError::BadPath(path.to_owned()));
        }
        if TileId::parse(path).is_some_and(|id| id.level.is_none()) {
            // Built from `ledger_entries` when read (see the module's doc).
            return Ok(());
        }
        self.pending
            .lock()
            .map_err(backend)?
            .insert(path.to_owned(), bytes.to_vec());
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut *self.pending.lock().map_err(backend)?);
        if pending.is_empty() {
            return Ok(());
        }
        let (paths, bodies): (Vec<&str>, Vec<&[u8]>) = pending
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .unzip();
        let written = self.block_on(self.client.execute(
            "insert into ledger_files (path, body) select * from unnest($1::text[], $2::bytea[])
             on conflict (path) do update set body = excluded.body",
            &[&paths, &bodies],
        ));
        if let Err(e) = written {
            // Put back under anything written since: a failed sync loses nothing.
            let mut now = self.pending.lock().map_err(backend)?;
            for (path, body) in pending {
                now.entry(path).or_insert(body);
            }
            return Err(backend(e));
        }
        Ok(())
    }

    fn publish_checkpoint(&self, note: &[u8]) -> Result<(), StoreError> {
        let offered = checkpoint_size(note)?;
        let size = i64::try_from(offered).map_err(backend)?;
        let moved = self
            .block_on(self.client.execute(
                "insert into ledger_checkpoint (tree_size, note) values ($1, $2)
                 on conflict (singleton) do update set tree_size = excluded.tree_size, note = excluded.note
                 where ledger_checkpoint.tree_size <= excluded.tree_size",
                &[&size, &note],
            ))
            .map_err(backend)?;
        if moved == 1 {
            return Ok(());
        }
        let stored: i64 = self
            .block_on(
                self.client
                    .query_one("select tree_size from ledger_checkpoint", &[]),
            )
            .map_err(backend)?
            .get(0);
        Err(StoreError::Stale {
            stored: u64::try_from(stored).unwrap_or(0),
            offered,
        })
    }
}
