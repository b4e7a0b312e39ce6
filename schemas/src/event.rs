//! Ledger events: every change to a balance, and every fact an auditor needs to
//! check one, is one of these, encoded as one canonical JSON object.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical::{self, CanonicalError};
use crate::receipt::CountersignedReceipt;
use crate::types::{AccountId, CreditsMicro, Digest, HoldId, JobId, PublicKey, WorkerId};

/// The only entry version so far. A reader refuses versions it does not know
/// rather than guessing at their meaning.
pub const ENTRY_VERSION: u64 = 1;

/// Entries are stored length-prefixed with a big-endian u16 in tlog-tiles entry bundles.
pub const MAX_ENTRY_BYTES: usize = 65_535;

/// Limits on free-text and list fields, so no single entry nears `MAX_ENTRY_BYTES`
/// except a price schedule at its model limit.
pub const MAX_MEMO_BYTES: usize = 256;
pub const MAX_MODEL_NAME_BYTES: usize = 128;
pub const MAX_MODELS_PER_SCHEDULE: usize = 256;
pub const MAX_KEY_NAME_BYTES: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountRole {
    Consumer,
    Worker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// Signs checkpoints of the ledger log.
    Log,
    /// Countersigns receipts.
    Coordinator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoidReason {
    /// The job failed before any output reached the consumer.
    Failed,
    /// The worker produced no output.
    Empty,
    /// The consumer went away before the first token.
    Cancelled,
    /// The coordinator restarted; the request died with it.
    CoordinatorRestart,
    /// The worker's receipt was rejected (bad signature, forged counts).
    ReceiptRejected,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub model: String,
    pub input_micro_per_1k: CreditsMicro,
    pub output_micro_per_1k: CreditsMicro,
}

/// One ledger event. `kind` is the tag; `v` is added by [`encode_entry`].
#[allow(
    clippy::large_enum_variant,
    reason = "settlements are most of the log; boxing them would add an allocation to the commonest entry"
)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    AccountOpened {
        account: AccountId,
        role: AccountRole,
        at_ms: u64,
    },
    /// Binds a worker's key (and so its id) to the account its earnings go to.
    WorkerRegistered {
        worker: WorkerId,
        key: PublicKey,
        account: AccountId,
        at_ms: u64,
    },
    /// Treasury → account.
    Grant {
        account: AccountId,
        amount_micro: CreditsMicro,
        memo: String,
        at_ms: u64,
    },
    /// Reserves `amount_micro` of `account`'s available balance for one job,
    /// priced at schedule `schedule_version`: its settlement is charged at that
    /// schedule, whatever was published since.
    HoldPlaced {
        hold: HoldId,
        job: JobId,
        account: AccountId,
        model: String,
        amount_micro: CreditsMicro,
        expires_at_ms: u64,
        schedule_version: u64,
        at_ms: u64,
        /// The cluster node incarnation whose request the hold is for: when
        /// that node dies, the account's owner voids the hold instead of
        /// letting it wait for its expiry. Absent on the embedded default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    /// Posts a hold: consumer pays `charged_micro` (≤ reserved), of which the
    /// worker earns `worker_earned_micro` and the treasury `fee_micro`; the rest
    /// of the reservation is released.
    HoldSettled {
        hold: HoldId,
        receipt: CountersignedReceipt,
        charged_micro: CreditsMicro,
        worker_earned_micro: CreditsMicro,
        fee_micro: CreditsMicro,
        at_ms: u64,
    },
    HoldVoided {
        hold: HoldId,
        reason: VoidReason,
        at_ms: u64,
    },
    /// Releases a hold whose deadline passed. Expiry is an explicit event so the
    /// fold never reads a clock.
    HoldExpired { hold: HoldId, at_ms: u64 },
    Transfer {
        from: AccountId,
        to: AccountId,
        amount_micro: CreditsMicro,
        memo: String,
        at_ms: u64,
    },
    /// Treasury → a worker's account, for one epoch of measured uptime.
    UptimeReward {
        worker: WorkerId,
        epoch: u64,
        heartbeats: u64,
        amount_micro: CreditsMicro,
        at_ms: u64,
    },
    /// Replaces the whole price schedule for new holds. A hold's settlement is
    /// checked against the schedule the hold names.
    PriceSchedulePublished {
        version: u64,
        fee_bps: u64,
        prices: Vec<ModelPrice>,
        at_ms: u64,
    },
    /// Declares the key that signs checkpoints (`log`) or countersigns receipts
    /// (`coordinator`) from this entry on.
    KeyRotated {
        role: KeyRole,
        name: String,
        key: PublicKey,
        at_ms: u64,
    },
    /// The fold's state at this point, compressed to a digest; an auditor's
    /// replay must reach the same digest here.
    BalanceSnapshot {
        accounts: u64,
        open_holds: u64,
        pending_micro: CreditsMicro,
        balances_digest: Digest,
        at_ms: u64,
    },
}

impl Event {
    /// Every kind, in the order `schemas/LEDGER.md` documents them.
    pub const KINDS: [&'static str; 12] = [
        "account_opened",
        "worker_registered",
        "grant",
        "hold_placed",
        "hold_settled",
        "hold_voided",
        "hold_expired",
        "transfer",
        "uptime_reward",
        "price_schedule_published",
        "key_rotated",
        "balance_snapshot",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Event::AccountOpened { .. } => "account_opened",
            Event::WorkerRegistered { .. } => "worker_registered",
            Event::Grant { .. } => "grant",
            Event::HoldPlaced { .. } => "hold_placed",
            Event::HoldSettled { .. } => "hold_settled",
            Event::HoldVoided { .. } => "hold_voided",
            Event::HoldExpired { .. } => "hold_expired",
            Event::Transfer { .. } => "transfer",
            Event::UptimeReward { .. } => "uptime_reward",
            Event::PriceSchedulePublished { .. } => "price_schedule_published",
            Event::KeyRotated { .. } => "key_rotated",
            Event::BalanceSnapshot { .. } => "balance_snapshot",
        }
    }

    pub fn at_ms(&self) -> u64 {
        match self {
            Event::AccountOpened { at_ms, .. }
            | Event::WorkerRegistered { at_ms, .. }
            | Event::Grant { at_ms, .. }
            | Event::HoldPlaced { at_ms, .. }
            | Event::HoldSettled { at_ms, .. }
            | Event::HoldVoided { at_ms, .. }
            | Event::HoldExpired { at_ms, .. }
            | Event::Transfer { at_ms, .. }
            | Event::UptimeReward { at_ms, .. }
            | Event::PriceSchedulePublished { at_ms, .. }
            | Event::KeyRotated { at_ms, .. }
            | Event::BalanceSnapshot { at_ms, .. } => *at_ms,
        }
    }

    /// Field limits that serde cannot express.
    fn check_limits(&self) -> Result<(), EntryError> {
        let too_long = |field: &'static str, s: &str, max: usize| {
            if s.len() > max {
                Err(EntryError::FieldTooLong { field, max })
            } else {
                Ok(())
            }
        };
        match self {
            Event::Grant { memo, .. } | Event::Transfer { memo, .. } => {
                too_long("memo", memo, MAX_MEMO_BYTES)
            }
            Event::HoldPlaced { model, .. } => too_long("model", model, MAX_MODEL_NAME_BYTES),
            Event::HoldSettled { receipt, .. } => too_long(
                "receipt.model",
                &receipt.receipt.model,
                MAX_MODEL_NAME_BYTES,
            ),
            Event::PriceSchedulePublished { prices, .. } => {
                if prices.len() > MAX_MODELS_PER_SCHEDULE {
                    return Err(EntryError::FieldTooLong {
                        field: "prices",
                        max: MAX_MODELS_PER_SCHEDULE,
                    });
                }
                prices
                    .iter()
                    .try_for_each(|p| too_long("model", &p.model, MAX_MODEL_NAME_BYTES))
            }
            Event::KeyRotated { name, .. } => too_long("name", name, MAX_KEY_NAME_BYTES),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry is {len} bytes; the limit is {MAX_ENTRY_BYTES}")]
    TooLarge { len: usize },
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
    #[error("entry is not a JSON object")]
    NotObject,
    #[error("entry has no integer `v` field")]
    MissingVersion,
    #[error("entry version {0} is not supported (this reader knows {ENTRY_VERSION})")]
    UnknownVersion(u64),
    #[error("entry does not match its schema: {0}")]
    Schema(String),
    #[error("field `{field}` exceeds its limit of {max}")]
    FieldTooLong { field: &'static str, max: usize },
}

/// Encodes an event as a versioned, canonical ledger entry.
pub fn encode_entry(event: &Event) -> Result<Vec<u8>, EntryError> {
    event.check_limits()?;
    let mut value = serde_json::to_value(event).map_err(|e| EntryError::Schema(e.to_string()))?;
    let Value::Object(map) = &mut value else {
        return Err(EntryError::NotObject);
    };
    map.insert("v".into(), Value::from(ENTRY_VERSION));
    let bytes = canonical::to_canonical_vec(&value)?;
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(EntryError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Parses a ledger entry, refusing anything that is not exactly what
/// [`encode_entry`] would have written for it.
pub fn decode_entry(bytes: &[u8]) -> Result<Event, EntryError> {
    decode_entry_spans(bytes).map(|(event, _)| event)
}

/// [`decode_entry`], also returning where each top-level field's value lies in
/// `bytes`, so that signed parts can be checked over the very bytes logged.
pub fn decode_entry_spans(bytes: &[u8]) -> Result<(Event, Vec<canonical::Member<'_>>), EntryError> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(EntryError::TooLarge { len: bytes.len() });
    }
    if bytes.first() != Some(&b'{') {
        return Err(EntryError::NotObject);
    }
    let members = canonical::check_canonical(bytes)?;
    let v = members
        .iter()
        .find(|m| m.key == "v")
        .ok_or(EntryError::MissingVersion)?;
    let version: u64 = std::str::from_utf8(&bytes[v.value.clone()])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(EntryError::MissingVersion)?;
    if version != ENTRY_VERSION {
        return Err(EntryError::UnknownVersion(version));
    }
    // Cut `"v":1` (and one comma) out, so the event's own schema can refuse
    // every field it does not know.
    let mut rest = Vec::with_capacity(bytes.len());
    let (mut cut_start, mut cut_end) = (v.member.start, v.member.end);
    if bytes.get(cut_end) == Some(&b',') {
        cut_end += 1;
    } else if cut_start > 1 {
        cut_start -= 1;
    }
    rest.extend_from_slice(&bytes[..cut_start]);
    rest.extend_from_slice(&bytes[cut_end..]);
    let event: Event =
        serde_json::from_slice(&rest).map_err(|e| EntryError::Schema(e.to_string()))?;
    event.check_limits()?;
    Ok((event, members))
}
