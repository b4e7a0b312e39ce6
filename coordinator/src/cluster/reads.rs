//! A cluster node's reads of the books ([`Reads`]), from the sequencer's
//! projection in Postgres: every node answers for every account, as of the
//! sequencer's last batch (CLUSTER.md, "Serving a request in the cluster").
//! Each answer comes from one statement, so from one snapshot: an account's
//! pending total always matches the holds it lists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use troop_ledger::fold::{Account, Ledger, Worker};
use troop_ledger::note::{Checkpoint, NoteVerifier};
use troop_ledger::tile::TileSource;
use troop_schemas::{AccountId, JobId, WorkerId};

use super::Reconnecting;
use super::ledger_store::read_file;
use super::rows::{
    ACCOUNT_COLUMNS, BadRow, HOLD_COLUMNS, RowError, account_of, hold_of, parse, registration,
    unsigned,
};
use crate::reads::{
    AccountView, Lag, LoggedReceipt, MAX_LIST_ACCOUNTS, Network, Read, ReadError, Reads,
};

/// The most tiles one proof may fetch: a proof reads one bundle and a few
/// tiles per level, and 256^5 entries are five levels.
const MAX_PROOF_FETCHES: usize = 64;

#[derive(Debug, Clone)]
pub struct PgReads {
    pg: Arc<Reconnecting>,
    /// The ledger's checkpoint key: a proof is only served against a
    /// checkpoint it verifies.
    verifier: Arc<NoteVerifier>,
}

impl PgReads {
    pub fn new(postgres: &str, verifier: NoteVerifier) -> Self {
        Self {
            pg: Arc::new(Reconnecting::new(postgres, "reads")),
            verifier: Arc::new(verifier),
        }
    }
}

fn unavailable(e: tokio_postgres::Error) -> ReadError {
    ReadError::Unavailable(format!("postgres: {e}"))
}

fn corrupt(what: &str, why: impl std::fmt::Display) -> ReadError {
    ReadError::Corrupt(format!("{what}: {why}"))
}

impl From<RowError> for ReadError {
    fn from(e: RowError) -> Self {
        match e {
            RowError::Postgres(e) => unavailable(e),
            RowError::Bad(e) => e.into(),
        }
    }
}

impl From<BadRow> for ReadError {
    fn from(e: BadRow) -> Self {
        ReadError::Corrupt(e.to_string())
    }
}

/// The tiles one proof reads, fetched from Postgres as the synchronous proof
/// builder asks for them: a miss names the path and fails the attempt.
#[derive(Default)]
struct Fetched {
    files: HashMap<String, Vec<u8>>,
    missing: Mutex<Option<String>>,
}

impl TileSource for Fetched {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        if let Some(body) = self.files.get(path) {
            return Ok(Some(body.clone()));
        }
        *self.missing.lock().map_err(|e| e.to_string())? = Some(path.to_owned());
        Err(format!("{path} not fetched yet"))
    }
}

/// The ledger's size in Postgres and the size its signed checkpoint covers.
pub async fn sizes(client: &tokio_postgres::Client) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            "select h.tree_size, coalesce(c.tree_size, 0) from ledger_head h
             left join ledger_checkpoint c on true",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

impl Reads for PgReads {
    fn account(&self, account: AccountId) -> Read<Option<AccountView>> {
        let pg = Arc::clone(&self.pg);
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            let rows = client
                .query(
                    &format!(
                        "select {ACCOUNT_COLUMNS}, {HOLD_COLUMNS}
                         from accounts a left join holds h on h.account = a.account
                         where a.account = $1 order by h.hold collate \"C\""
                    ),
                    &[&account.to_string()],
                )
                .await
                .map_err(unavailable)?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let holds = rows
                .iter()
                .filter(|r| r.get::<_, Option<&str>>(4).is_some())
                .map(|row| hold_of(row, 4))
                .collect::<Result<_, _>>()?;
            Ok(Some(AccountView {
                account: account_of(first, 0)?,
                holds,
            }))
        })
    }

    fn accounts(&self, after: Option<AccountId>, limit: usize) -> Read<Vec<(AccountId, Account)>> {
        let pg = Arc::clone(&self.pg);
        let limit = i64::try_from(limit.min(MAX_LIST_ACCOUNTS)).unwrap_or(0);
        // Ids are lowercase hex after a common prefix: byte order is id order.
        let after = after.map_or_else(String::new, |a| a.to_string());
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            let rows = client
                .query(
                    &format!(
                        "select a.account, {ACCOUNT_COLUMNS} from accounts a
                         where a.account collate \"C\" > $1 order by a.account collate \"C\" limit $2"
                    ),
                    &[&after, &limit],
                )
                .await
                .map_err(unavailable)?;
            rows.iter()
                .map(|row| Ok((parse("account", row.get(0))?, account_of(row, 1)?)))
                .collect()
        })
    }

    fn worker(&self, worker: WorkerId) -> Read<Option<Worker>> {
        let pg = Arc::clone(&self.pg);
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            Ok(registration(&client, &worker).await?)
        })
    }

    fn receipt(&self, job: JobId) -> Read<Option<LoggedReceipt>> {
        let (pg, verifier) = (Arc::clone(&self.pg), Arc::clone(&self.verifier));
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            let Some(row) = client
                .query_opt(
                    "select r.leaf_index, c.note from receipts r join ledger_checkpoint c
                     on r.leaf_index < c.tree_size where r.job = $1",
                    &[&job.to_string()],
                )
                .await
                .map_err(unavailable)?
            else {
                // Not settled, or not yet in a signed checkpoint.
                return Ok(None);
            };
            let index = unsigned("leaf index", row.get(0))?;
            let note = String::from_utf8(row.get(1)).map_err(|e| corrupt("checkpoint", e))?;
            let checkpoint =
                Checkpoint::open(&note, &verifier).map_err(|e| corrupt("checkpoint", e))?;
            let mut fetched = Fetched::default();
            for _ in 0..MAX_PROOF_FETCHES {
                let why = match crate::reads::prove(&fetched, &note, &checkpoint, index) {
                    Ok(logged) => return Ok(Some(logged)),
                    Err(why) => why,
                };
                let Some(path) = fetched
                    .missing
                    .get_mut()
                    .map_err(|e| corrupt("proof", e))?
                    .take()
                else {
                    return Err(corrupt("proof", why));
                };
                let body = read_file(&client, &path)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(|| corrupt(&path, "missing under a published checkpoint"))?;
                fetched.files.insert(path, body);
            }
            Err(corrupt(
                "proof",
                "reads more tiles than any tree has levels",
            ))
        })
    }

    fn ledger_file(&self, path: String) -> Read<Option<Vec<u8>>> {
        let pg = Arc::clone(&self.pg);
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            read_file(&client, &path).await.map_err(unavailable)
        })
    }

    fn lag(&self) -> Read<Lag> {
        let pg = Arc::clone(&self.pg);
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            let (size, published) = sizes(&client).await.map_err(unavailable)?;
            Ok(Lag {
                entries: unsigned("entries", size)?,
                ledger_entries: unsigned("lag", (size - published).max(0))?,
                log_records: None,
            })
        })
    }

    fn network(&self) -> Read<Network> {
        let pg = Arc::clone(&self.pg);
        Box::pin(async move {
            let client = pg.get().await.map_err(unavailable)?;
            let rows = client
                .query(
                    "select e.leaf_index, e.entry from network_entries n
                     join ledger_entries e using (leaf_index) order by leaf_index",
                    &[],
                )
                .await
                .map_err(unavailable)?;
            // Prices and keys need nothing else of the ledger: folded alone,
            // in order, they are what the whole fold holds of them.
            let mut ledger = Ledger::new();
            for row in rows {
                let leaf: i64 = row.get(0);
                let event = troop_schemas::decode_entry(row.get(1))
                    .map_err(|e| corrupt(&format!("leaf {leaf}"), e))?;
                ledger
                    .apply(&event)
                    .map_err(|e| corrupt(&format!("leaf {leaf}"), e))?;
            }
            Ok(Network::of(&ledger))
        })
    }
}
