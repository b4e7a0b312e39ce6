//! Receipts: what a worker signs about one job, and what the coordinator adds
//! when it countersigns. Signing itself lives in `troop-ledger`; this is the wire form.

use serde::{Deserialize, Serialize};

use crate::canonical::{self, CanonicalError};
use crate::types::{AccountId, Digest, HoldId, JobId, PublicKey, Signature, WorkerId};

/// Domain separation: a receipt signature can never be replayed as any other
/// signed Troop message, nor the other way round.
pub const RECEIPT_DOMAIN: &[u8] = b"troop-receipt/v1\n";
pub const COUNTERSIGN_DOMAIN: &[u8] = b"troop-countersign/v1\n";

/// The worker's claim about one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub job: JobId,
    pub hold: HoldId,
    pub consumer: AccountId,
    pub worker: WorkerId,
    pub worker_key: PublicKey,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// BLAKE3 of the request body as the worker received it.
    pub request_digest: Digest,
    /// BLAKE3 of the output bytes as streamed.
    pub response_digest: Digest,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

/// A receipt the worker signed, with the counts the coordinator billed (its own
/// count of what it streamed, never the worker's word) and its countersignature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersignedReceipt {
    pub receipt: Receipt,
    pub worker_sig: Signature,
    pub billed_input_tokens: u64,
    pub billed_output_tokens: u64,
    pub coordinator_key: PublicKey,
    pub coordinator_sig: Signature,
}

/// What the coordinator's signature covers: everything but the signature itself.
#[derive(Serialize)]
struct CountersignBody<'a> {
    receipt: &'a Receipt,
    worker_sig: &'a Signature,
    billed_input_tokens: u64,
    billed_output_tokens: u64,
    coordinator_key: &'a PublicKey,
}

fn canonical_with_domain<T: Serialize>(domain: &[u8], body: &T) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(body).map_err(|e| CanonicalError::Syntax(e.to_string()))?;
    let mut out = domain.to_vec();
    out.extend(canonical::to_canonical_vec(&value)?);
    Ok(out)
}

impl Receipt {
    /// The exact bytes the worker signs.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, CanonicalError> {
        canonical_with_domain(RECEIPT_DOMAIN, self)
    }
}

impl CountersignedReceipt {
    /// The exact bytes the coordinator signs.
    pub fn countersigning_bytes(&self) -> Result<Vec<u8>, CanonicalError> {
        countersigning_bytes(
            &self.receipt,
            &self.worker_sig,
            self.billed_input_tokens,
            self.billed_output_tokens,
            &self.coordinator_key,
        )
    }
}

pub fn countersigning_bytes(
    receipt: &Receipt,
    worker_sig: &Signature,
    billed_input_tokens: u64,
    billed_output_tokens: u64,
    coordinator_key: &PublicKey,
) -> Result<Vec<u8>, CanonicalError> {
    canonical_with_domain(
        COUNTERSIGN_DOMAIN,
        &CountersignBody {
            receipt,
            worker_sig,
            billed_input_tokens,
            billed_output_tokens,
            coordinator_key,
        },
    )
}
