//! The cluster's directory (API keys, bans): the sequencer projects the
//! records it reads beside the ledger entries ([`project`], in the batch's
//! transaction), and every node keeps its copy current from there
//! ([`follow`]), so a key issued or revoked on one node counts on every
//! node within about a second of being sequenced.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use troop_schemas::{AccountId, ApiKeyId, WorkerId};

use crate::cluster::Reconnecting;
use crate::directory::{BanEvent, Directory, KeyEvent};
use crate::keys::ApiKeys;

/// Rows read per look; more are read at the next one, at once.
pub const MAX_CHANGES_PER_READ: i64 = 10_000;

/// Projects `records` (in log order) in the sequencer's transaction. Each
/// write is idempotent — a redelivered issue, revocation or ban changes
/// nothing — so no event ids are needed.
pub async fn project(
    tx: &impl tokio_postgres::GenericClient,
    records: &[Directory],
) -> Result<(), tokio_postgres::Error> {
    for record in records {
        match record {
            Directory::Key(KeyEvent::Issued {
                key, account, hash, ..
            }) => {
                let Some(h) = key_hash(key, hash) else {
                    continue;
                };
                tx.execute(
                    "insert into api_keys (key_id, account, secret_hash) values ($1, $2, $3)
                     on conflict (key_id) do nothing",
                    &[&key.to_string(), &account.to_string(), &h.as_slice()],
                )
                .await?;
            }
            Directory::Key(KeyEvent::Revoked { key, .. }) => {
                tx.execute(
                    "update api_keys set revoked = true, change_seq = nextval('directory_changes')
                     where key_id = $1 and not revoked",
                    &[&key.to_string()],
                )
                .await?;
            }
            Directory::Ban(BanEvent::Banned { worker, at_ms }) => {
                tx.execute(
                    "insert into bans (worker, at_ms) values ($1, $2) on conflict (worker) do nothing",
                    &[&worker.to_string(), &i64::try_from(*at_ms).unwrap_or(i64::MAX)],
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// A key as the directory holds it.
/// An issued key's stored hash: 32 bytes from hex, or none (skipped, as the
/// embedded table does: a key that cannot authenticate).
pub(crate) fn key_hash(key: &ApiKeyId, hash: &str) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    if hex::decode_to_slice(hash, &mut h).is_err() {
        tracing::error!(%key, "an issued key's hash is not 32 hex bytes; skipped");
        return None;
    }
    Some(h)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub key: ApiKeyId,
    pub account: AccountId,
    pub hash: [u8; 32],
    pub revoked: bool,
}

/// What changed after change number `since`: keys, bans, and the newest
/// change number seen (`since` if none).
#[derive(Debug, Default)]
pub struct Changes {
    pub keys: Vec<KeyRow>,
    pub bans: Vec<WorkerId>,
    pub newest: i64,
}

/// Up to [`MAX_CHANGES_PER_READ`] keys and as many bans changed after `since`.
pub async fn changes_since(
    client: &tokio_postgres::Client,
    since: i64,
) -> Result<Changes, tokio_postgres::Error> {
    let mut changes = Changes {
        newest: since,
        ..Changes::default()
    };
    let keys = client
        .query(
            "select key_id, account, secret_hash, revoked, change_seq from api_keys
             where change_seq > $1 order by change_seq limit $2",
            &[&since, &MAX_CHANGES_PER_READ],
        )
        .await?;
    let bans = client
        .query(
            "select worker, change_seq from bans where change_seq > $1 order by change_seq limit $2",
            &[&since, &MAX_CHANGES_PER_READ],
        )
        .await?;
    // A full page of either may have more after it: go no further than the
    // lower page end, so the next look starts where nothing was skipped.
    let full_end = |rows: &[tokio_postgres::Row], column: usize| {
        (rows.len() as i64 == MAX_CHANGES_PER_READ).then(|| rows.last().map(|r| r.get(column)))
    };
    let limit: Option<i64> = [full_end(&keys, 4), full_end(&bans, 1)]
        .into_iter()
        .flatten()
        .flatten()
        .min();
    let within = |seq: i64| limit.is_none_or(|l| seq <= l);
    for row in keys.iter().filter(|r| within(r.get(4))) {
        let (key, account): (String, String) = (row.get(0), row.get(1));
        let hash: Vec<u8> = row.get(2);
        let (Ok(key), Ok(account), Ok(hash)) = (
            key.parse::<ApiKeyId>(),
            account.parse::<AccountId>(),
            <[u8; 32]>::try_from(hash.as_slice()),
        ) else {
            tracing::error!(key, "a key row that does not parse is skipped");
            continue;
        };
        changes.keys.push(KeyRow {
            key,
            account,
            hash,
            revoked: row.get(3),
        });
        changes.newest = changes.newest.max(row.get(4));
    }
    for row in bans.iter().filter(|r| within(r.get(1))) {
        let worker: String = row.get(0);
        match worker.parse::<WorkerId>() {
            Ok(w) => changes.bans.push(w),
            Err(_) => tracing::error!(worker, "a ban row that does not parse is skipped"),
        }
        changes.newest = changes.newest.max(row.get(1));
    }
    Ok(changes)
}

/// Keeps `keys` and `bans` current with the directory until `stop`: a look
/// every `every`, and at once again after a full page. `banned` is told of
/// every ban seen (the registry drops the worker's connection).
pub async fn follow(
    postgres: Arc<Reconnecting>,
    keys: Arc<RwLock<ApiKeys>>,
    bans: Arc<RwLock<HashSet<WorkerId>>>,
    banned: impl Fn(WorkerId) + Send + 'static,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut since = 0;
    loop {
        let looked = async {
            let client = postgres.get().await?;
            changes_since(&client, since).await
        }
        .await;
        let full = match looked {
            Ok(changes) => {
                let full = changes.newest > since
                    && (changes.keys.len() as i64 == MAX_CHANGES_PER_READ
                        || changes.bans.len() as i64 == MAX_CHANGES_PER_READ);
                since = changes.newest;
                {
                    let mut table = keys.write().expect("keys lock");
                    for k in changes.keys {
                        table.set(k.key, k.account, k.hash, k.revoked);
                    }
                }
                for worker in changes.bans {
                    if bans.write().expect("bans lock").insert(worker) {
                        banned(worker);
                    }
                }
                full
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the directory failed; trying again");
                false
            }
        };
        if full {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
