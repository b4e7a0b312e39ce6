//! One set of readers for the projection's rows, shared by the API's reads
//! ([`crate::cluster::reads`]) and the sequencer's store
//! ([`crate::cluster::projection_store::PgProjection`]): a column's meaning
//! and its checks live in one place, and each layer maps [`RowError`] into
//! its own error.

use std::str::FromStr;

use troop_ledger::fold::{Account, Hold, Worker};
use troop_schemas::{AccountRole, CreditsMicro, HoldId, PublicKey, WorkerId};

/// A stored value that does not parse or fit: something other than the
/// sequencer wrote the row, or a migration is missing.
#[derive(Debug, thiserror::Error)]
#[error("a stored {what} is bad: {why}")]
pub struct BadRow {
    pub what: &'static str,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Bad(#[from] BadRow),
}

fn bad(what: &'static str, why: impl std::fmt::Display) -> BadRow {
    BadRow {
        what,
        why: why.to_string(),
    }
}

pub fn parse<T: FromStr<Err: std::fmt::Display>>(
    what: &'static str,
    text: &str,
) -> Result<T, BadRow> {
    text.parse()
        .map_err(|e| bad(what, format!("{text:?}: {e}")))
}

pub fn unsigned(what: &'static str, v: i64) -> Result<u64, BadRow> {
    u64::try_from(v).map_err(|e| bad(what, e))
}

/// An `accounts` row's columns from `first` on: role, then the three totals
/// as text (numeric(39,0) has no binary Rust type here). Select them with
/// [`ACCOUNT_COLUMNS`].
pub fn account_of(row: &tokio_postgres::Row, first: usize) -> Result<Account, BadRow> {
    let role = row
        .get::<_, Option<String>>(first)
        .map(|r| {
            serde_json::from_value::<AccountRole>(serde_json::Value::String(r))
                .map_err(|e| bad("role", e))
        })
        .transpose()?;
    let total = |i: usize| parse::<u128>("total", row.get::<_, &str>(first + i));
    Ok(Account {
        role,
        debits_posted: total(1)?,
        credits_posted: total(2)?,
        debits_pending: total(3)?,
    })
}

/// The role's wire name, as the `accounts` table keeps it ([`account_of`]
/// reads it back).
pub fn role_name(role: AccountRole) -> String {
    serde_json::to_value(role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// What [`account_of`] reads, from `accounts a`.
pub const ACCOUNT_COLUMNS: &str =
    "a.role, a.debits_posted::text, a.credits_posted::text, a.debits_pending::text";

/// A `holds` row's columns from `first` on, selected with [`HOLD_COLUMNS`].
pub fn hold_of(row: &tokio_postgres::Row, first: usize) -> Result<(HoldId, Hold), BadRow> {
    let version: Option<i64> = row.get(first + 6);
    let version = version.ok_or_else(|| {
        bad(
            "hold",
            "no schedule version (projected before migration 3: run replay)",
        )
    })?;
    Ok((
        parse("hold", row.get(first))?,
        Hold {
            account: parse("account", row.get(first + 1))?,
            job: parse("job", row.get(first + 2))?,
            model: row.get(first + 3),
            amount: CreditsMicro::new(unsigned("amount", row.get(first + 4))?)
                .ok_or_else(|| bad("amount", "above 2^53-1"))?,
            expires_at_ms: unsigned("expiry", row.get(first + 5))?,
            schedule_version: unsigned("schedule version", version)?,
            origin: row.get(first + 7),
        },
    ))
}

/// What [`hold_of`] reads, from `holds h`.
pub const HOLD_COLUMNS: &str = "h.hold, h.account, h.job, h.model, h.amount_micro, h.expires_at_ms,
     h.schedule_version, h.origin_node";

/// `worker`'s registration: its key and the account it is paid into.
pub async fn registration(
    client: &tokio_postgres::Client,
    worker: &WorkerId,
) -> Result<Option<Worker>, RowError> {
    let Some(row) = client
        .query_opt(
            "select worker_key, account from worker_registrations where worker = $1",
            &[&worker.to_string()],
        )
        .await?
    else {
        return Ok(None);
    };
    let key: &[u8] = row.get(0);
    Ok(Some(Worker {
        key: PublicKey(key.try_into().map_err(|e| bad("worker key", e))?),
        account: parse("account", row.get(1))?,
    }))
}
