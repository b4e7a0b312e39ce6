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
    // Fields in lexicographic order: serde writes them in declaration order, so
    // plain `serde_json` output is already canonical (checked in tests).
    pub consumer: AccountId,
    pub finished_at_ms: u64,
    pub hold: HoldId,
    pub input_tokens: u64,
    pub job: JobId,
    pub model: String,
    pub output_tokens: u64,
    /// BLAKE3 of the request body as the worker received it.
    pub request_digest: Digest,
    /// BLAKE3 of the output bytes as streamed.
    pub response_digest: Digest,
    pub started_at_ms: u64,
    pub worker: WorkerId,
    pub worker_key: PublicKey,
}

/// A receipt the worker signed, with the counts the coordinator billed (its own
/// count of what it streamed, never the worker's word) and its countersignature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersignedReceipt {
    pub billed_input_tokens: u64,
    pub billed_output_tokens: u64,
    pub coordinator_key: PublicKey,
    pub coordinator_sig: Signature,
    pub receipt: Receipt,
    pub worker_sig: Signature,
}

/// What the coordinator's signature covers: everything but the signature itself.
#[derive(Serialize)]
struct CountersignBody<'a> {
    billed_input_tokens: u64,
    billed_output_tokens: u64,
    coordinator_key: &'a PublicKey,
    receipt: &'a Receipt,
    worker_sig: &'a Signature,
}

/// `domain || canonical JSON of body`, written straight by `serde_json`: the
/// structs signed here have lexicographically ordered fields, no maps and no
/// floats, and `serde_json` escapes strings exactly as RFC 8785 does, so its
/// output is canonical once integers are known to be in range. Signing and
/// verifying millions of receipts makes the detour through `Value` count.
fn canonical_with_domain<T: Serialize>(
    domain: &[u8],
    body: &T,
    ints: &[u64],
) -> Result<Vec<u8>, CanonicalError> {
    if ints.iter().any(|&i| i > canonical::MAX_SAFE_INTEGER) {
        return Err(CanonicalError::IntegerRange {
            path: "receipt".into(),
        });
    }
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(domain);
    serde_json::to_writer(&mut out, body).map_err(|e| CanonicalError::Syntax(e.to_string()))?;
    debug_assert!(
        canonical::check_canonical(&out[domain.len()..]).is_ok(),
        "signed bytes must be canonical"
    );
    Ok(out)
}

impl Receipt {
    /// The exact bytes the worker signs.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, CanonicalError> {
        canonical_with_domain(RECEIPT_DOMAIN, self, &self.integers())
    }

    fn integers(&self) -> [u64; 4] {
        [
            self.input_tokens,
            self.output_tokens,
            self.started_at_ms,
            self.finished_at_ms,
        ]
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
    let [a, b, c, d] = receipt.integers();
    canonical_with_domain(
        COUNTERSIGN_DOMAIN,
        &CountersignBody {
            billed_input_tokens,
            billed_output_tokens,
            coordinator_key,
            receipt,
            worker_sig,
        },
        &[a, b, c, d, billed_input_tokens, billed_output_tokens],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(n: u64, model: &str) -> Receipt {
        Receipt {
            consumer: AccountId::derive(&n.to_le_bytes()),
            finished_at_ms: n + 5,
            hold: HoldId::derive(b"h"),
            input_tokens: n,
            job: JobId::derive(b"j"),
            model: model.into(),
            output_tokens: n * 2,
            request_digest: Digest::of(b"a"),
            response_digest: Digest::of(b"b"),
            started_at_ms: n,
            worker: WorkerId::derive(b"w"),
            worker_key: PublicKey([1; 32]),
        }
    }

    proptest::proptest! {
        /// The direct encoding equals the general canonicalizer's, whatever the model name holds.
        #[test]
        fn direct_encoding_is_canonical(n in 0..canonical::MAX_SAFE_INTEGER / 2, model in "\\PC{0,40}|[\\x00-\\x1f\"\\\\/\\u{7f}\\u{2028}]{0,8}") {
            let r = receipt(n, &model);
            let direct = r.signing_bytes().expect("encodes");
            let general = canonical::to_canonical_vec(&serde_json::to_value(&r).expect("value")).expect("canonical");
            proptest::prop_assert_eq!(&direct[RECEIPT_DOMAIN.len()..], &general[..]);
        }
    }

    #[test]
    fn out_of_range_integers_are_refused() {
        let mut r = receipt(1, "m");
        r.output_tokens = canonical::MAX_SAFE_INTEGER + 1;
        assert!(r.signing_bytes().is_err());
    }
}
