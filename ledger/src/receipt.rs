//! Signing and verifying receipts. Batch verification for auditors, with a
//! strict one-by-one fallback that names the bad signature.

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use troop_schemas::receipt::{COUNTERSIGN_DOMAIN, RECEIPT_DOMAIN, countersigning_bytes};
use troop_schemas::{CountersignedReceipt, PublicKey, Receipt, Signature, WorkerId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("receipt cannot be encoded: {0}")]
    Encoding(String),
    #[error("{who} key is not a valid Ed25519 point")]
    InvalidKey { who: &'static str },
    #[error("{who} key is weak (small order)")]
    WeakKey { who: &'static str },
    #[error("{who} signature does not verify")]
    BadSignature { who: &'static str },
    #[error("worker id does not match the worker's key")]
    WorkerIdMismatch,
}

pub fn public_key(key: &SigningKey) -> PublicKey {
    PublicKey(key.verifying_key().to_bytes())
}

/// The worker's signature over its receipt.
pub fn sign_receipt(worker: &SigningKey, receipt: &Receipt) -> Result<Signature, ReceiptError> {
    let bytes = receipt
        .signing_bytes()
        .map_err(|e| ReceiptError::Encoding(e.to_string()))?;
    Ok(Signature(worker.sign(&bytes).to_bytes()))
}

/// The coordinator's countersignature over a worker-signed receipt and the counts it billed.
pub fn countersign(
    coordinator: &SigningKey,
    receipt: Receipt,
    worker_sig: Signature,
    billed_input_tokens: u64,
    billed_output_tokens: u64,
) -> Result<CountersignedReceipt, ReceiptError> {
    let coordinator_key = public_key(coordinator);
    let bytes = countersigning_bytes(
        &receipt,
        &worker_sig,
        billed_input_tokens,
        billed_output_tokens,
        &coordinator_key,
    )
    .map_err(|e| ReceiptError::Encoding(e.to_string()))?;
    let coordinator_sig = Signature(coordinator.sign(&bytes).to_bytes());
    Ok(CountersignedReceipt {
        receipt,
        worker_sig,
        billed_input_tokens,
        billed_output_tokens,
        coordinator_key,
        coordinator_sig,
    })
}

fn verifying_key(key: &PublicKey, who: &'static str) -> Result<VerifyingKey, ReceiptError> {
    let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| ReceiptError::InvalidKey { who })?;
    if vk.is_weak() {
        return Err(ReceiptError::WeakKey { who });
    }
    Ok(vk)
}

/// One signature to check: message, signature, key, and who made it.
#[derive(Debug, Clone)]
pub struct SignedMessage {
    pub message: Vec<u8>,
    pub signature: ed25519_dalek::Signature,
    pub key: VerifyingKey,
    pub who: &'static str,
}

impl SignedMessage {
    pub fn verify_strict(&self) -> Result<(), ReceiptError> {
        self.key
            .verify_strict(&self.message, &self.signature)
            .map_err(|_| ReceiptError::BadSignature { who: self.who })
    }
}

/// Decompressed, checked keys by their bytes. Decompressing a point costs
/// about as much as hashing a whole receipt, and a log has few distinct keys.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: std::collections::HashMap<[u8; 32], VerifyingKey>,
}

/// Bounded: a log with more distinct keys than this just decompresses more.
const KEY_CACHE_ENTRIES: usize = 65_536;

impl KeyCache {
    fn get(&mut self, key: &PublicKey, who: &'static str) -> Result<VerifyingKey, ReceiptError> {
        if let Some(k) = self.keys.get(&key.0) {
            return Ok(*k);
        }
        let vk = verifying_key(key, who)?;
        if self.keys.len() >= KEY_CACHE_ENTRIES {
            self.keys.clear();
        }
        self.keys.insert(key.0, vk);
        Ok(vk)
    }
}

/// The two signatures of a countersigned receipt, with its structural checks
/// (keys valid and not weak, worker id derived from the worker key) done.
pub fn receipt_signatures(r: &CountersignedReceipt) -> Result<[SignedMessage; 2], ReceiptError> {
    receipt_signatures_cached(r, &mut KeyCache::default())
}

/// [`receipt_signatures`] with decompressed keys remembered across calls.
pub fn receipt_signatures_cached(
    r: &CountersignedReceipt,
    cache: &mut KeyCache,
) -> Result<[SignedMessage; 2], ReceiptError> {
    let [mut worker, mut coordinator] = receipt_signatures_keys_only(r, cache)?;
    worker.message = r
        .receipt
        .signing_bytes()
        .map_err(|e| ReceiptError::Encoding(e.to_string()))?;
    coordinator.message = r
        .countersigning_bytes()
        .map_err(|e| ReceiptError::Encoding(e.to_string()))?;
    Ok([worker, coordinator])
}

/// [`receipt_signatures_cached`] over the receipt's bytes as logged: `logged`
/// is the canonical JSON of `r` cut from a ledger entry. The signed messages are
/// slices of it (the worker's receipt object; the whole minus the coordinator's
/// signature), so nothing is serialized again — an auditor does this for every
/// receipt in the log.
pub fn logged_receipt_signatures(
    logged: &[u8],
    r: &CountersignedReceipt,
    cache: &mut KeyCache,
) -> Result<[SignedMessage; 2], ReceiptError> {
    let [mut worker, mut coordinator] = receipt_signatures_keys_only(r, cache)?;
    let members = troop_schemas::canonical::check_canonical(logged)
        .map_err(|e| ReceiptError::Encoding(e.to_string()))?;
    let find = |key: &str| {
        members
            .iter()
            .find(|m| m.key == key)
            .ok_or_else(|| ReceiptError::Encoding(format!("no `{key}` in receipt")))
    };
    let inner = find("receipt")?.value.clone();
    let sig = find("coordinator_sig")?.member.clone();
    // `coordinator_sig` sorts before `receipt` and `worker_sig`: a comma follows it.
    if logged.get(sig.end) != Some(&b',') {
        return Err(ReceiptError::Encoding(
            "coordinator_sig is not followed by another field".into(),
        ));
    }
    worker.message = [RECEIPT_DOMAIN, &logged[inner]].concat();
    coordinator.message = [
        COUNTERSIGN_DOMAIN,
        &logged[..sig.start],
        &logged[sig.end + 1..],
    ]
    .concat();
    debug_assert_eq!(
        Ok(&worker.message),
        r.receipt.signing_bytes().as_ref().map_err(|_| ())
    );
    debug_assert_eq!(
        Ok(&coordinator.message),
        r.countersigning_bytes().as_ref().map_err(|_| ())
    );
    Ok([worker, coordinator])
}

/// The structural checks and keys of [`receipt_signatures_cached`], with empty messages.
fn receipt_signatures_keys_only(
    r: &CountersignedReceipt,
    cache: &mut KeyCache,
) -> Result<[SignedMessage; 2], ReceiptError> {
    if WorkerId::from_key(&r.receipt.worker_key) != r.receipt.worker {
        return Err(ReceiptError::WorkerIdMismatch);
    }
    Ok([
        SignedMessage {
            message: Vec::new(),
            signature: ed25519_dalek::Signature::from_bytes(&r.worker_sig.0),
            key: cache.get(&r.receipt.worker_key, "worker")?,
            who: "worker",
        },
        SignedMessage {
            message: Vec::new(),
            signature: ed25519_dalek::Signature::from_bytes(&r.coordinator_sig.0),
            key: cache.get(&r.coordinator_key, "coordinator")?,
            who: "coordinator",
        },
    ])
}

/// Strict verification of one countersigned receipt.
pub fn verify_receipt(r: &CountersignedReceipt) -> Result<(), ReceiptError> {
    receipt_signatures(r)?
        .iter()
        .try_for_each(SignedMessage::verify_strict)
}

/// The two signatures of the receipt in a settlement entry, over the entry's
/// bytes as logged (`members`: the entry's top-level fields, from
/// `decode_entry_spans`); `None` for every other event.
pub fn entry_receipt_signatures(
    entry: &[u8],
    members: &[troop_schemas::canonical::Member<'_>],
    event: &troop_schemas::Event,
    cache: &mut KeyCache,
) -> Result<Option<[SignedMessage; 2]>, ReceiptError> {
    let troop_schemas::Event::HoldSettled { receipt, .. } = event else {
        return Ok(None);
    };
    let span = members
        .iter()
        .find(|m| m.key == "receipt")
        .map(|m| m.value.clone())
        .ok_or_else(|| ReceiptError::Encoding("no `receipt` in the entry".into()))?;
    let logged = entry
        .get(span)
        .ok_or_else(|| ReceiptError::Encoding("receipt span outside the entry".into()))?;
    logged_receipt_signatures(logged, receipt, cache).map(Some)
}

/// Signatures per batch verification: batches of a few thousand run about 1.5×
/// faster per signature than batches of a bundle's ~250 (BENCHMARKS.md).
pub const SIGS_PER_BATCH: usize = 2048;

/// Verifies every signature in `items`, in batches on all cores. On failure,
/// the position of the first bad one (the lowest, whatever order the batches
/// finished in) and why.
pub fn verify_all<T>(items: &[T]) -> Result<(), (usize, ReceiptError)>
where
    T: std::borrow::Borrow<SignedMessage> + Sync,
{
    use rayon::prelude::*;
    let failures: Vec<(usize, ReceiptError)> = items
        .par_chunks(SIGS_PER_BATCH)
        .enumerate()
        .filter_map(|(c, chunk)| {
            verify_batch(chunk).err().map(|bad| {
                let (pos, e) = bad.into_iter().next().expect("failure names at least one");
                (c * SIGS_PER_BATCH + pos, e)
            })
        })
        .collect();
    match failures.into_iter().min_by_key(|(pos, _)| *pos) {
        Some(first) => Err(first),
        None => Ok(()),
    }
}

/// Verifies many signatures at once. On success every one is valid; on failure,
/// returns the positions (in `items`) of the ones that fail strict verification.
///
/// Batch verification is about twice as fast per signature; the strict fallback
/// runs only when something is wrong, to say exactly what.
pub fn verify_batch<T: std::borrow::Borrow<SignedMessage>>(
    items: &[T],
) -> Result<(), Vec<(usize, ReceiptError)>> {
    if items.is_empty() {
        return Ok(());
    }
    let messages: Vec<&[u8]> = items
        .iter()
        .map(|i| i.borrow().message.as_slice())
        .collect();
    let signatures: Vec<ed25519_dalek::Signature> =
        items.iter().map(|i| i.borrow().signature).collect();
    let keys: Vec<VerifyingKey> = items.iter().map(|i| i.borrow().key).collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return Ok(());
    }
    let bad: Vec<(usize, ReceiptError)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| item.borrow().verify_strict().err().map(|e| (i, e)))
        .collect();
    // A batch can fail on a signature that strict verification also rejects,
    // never the other way round: if none fails strictly, report the batch.
    if bad.is_empty() {
        Err(vec![(0, ReceiptError::BadSignature { who: "batch" })])
    } else {
        Err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use troop_schemas::{AccountId, Digest, HoldId, JobId};

    fn receipt(worker: &SigningKey) -> Receipt {
        let worker_key = public_key(worker);
        Receipt {
            job: JobId::derive(b"j"),
            hold: HoldId::derive(b"h"),
            consumer: AccountId::derive(b"c"),
            worker: WorkerId::from_key(&worker_key),
            worker_key,
            model: "smollm2".into(),
            input_tokens: 12,
            output_tokens: 34,
            request_digest: Digest::of(b"req"),
            response_digest: Digest::of(b"resp"),
            started_at_ms: 1,
            finished_at_ms: 2,
        }
    }

    #[test]
    fn sign_countersign_verify() {
        let (w, c) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let r = receipt(&w);
        let sig = sign_receipt(&w, &r).expect("sign");
        let cr = countersign(&c, r, sig, 12, 34).expect("countersign");
        verify_receipt(&cr).expect("valid");

        let mut inflated = cr.clone();
        inflated.receipt.output_tokens = 3400;
        assert_eq!(
            verify_receipt(&inflated),
            Err(ReceiptError::BadSignature { who: "worker" })
        );

        let mut rebilled = cr.clone();
        rebilled.billed_output_tokens = 35;
        assert_eq!(
            verify_receipt(&rebilled),
            Err(ReceiptError::BadSignature { who: "coordinator" })
        );

        let mut stolen = cr;
        stolen.receipt.worker = WorkerId::derive(b"someone else");
        assert_eq!(verify_receipt(&stolen), Err(ReceiptError::WorkerIdMismatch));
    }

    #[test]
    fn batch_names_the_bad_one() {
        let (w, c) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let mut items = Vec::new();
        for i in 0..10u64 {
            let mut r = receipt(&w);
            r.output_tokens = i;
            let sig = sign_receipt(&w, &r).expect("sign");
            let cr = countersign(&c, r, sig, 1, i).expect("countersign");
            items.extend(receipt_signatures(&cr).expect("structure"));
        }
        assert_eq!(verify_batch(&items), Ok(()));
        items[7].message.push(b'!');
        let bad = verify_batch(&items).expect_err("one is bad");
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 7);
        items[7].message.pop();
        // Across batches on several threads, the first bad one is named.
        let mut many: Vec<SignedMessage> = items
            .iter()
            .cycle()
            .take(3 * SIGS_PER_BATCH)
            .cloned()
            .collect();
        assert_eq!(verify_all(&many), Ok(()));
        let (later, first) = (2 * SIGS_PER_BATCH + 5, SIGS_PER_BATCH + 11);
        many[later].message.push(b'!');
        many[first].message.push(b'!');
        assert_eq!(verify_all(&many).map_err(|(pos, _)| pos), Err(first));
        assert_eq!(verify_all(&many[..0]), Ok(()));
        assert_eq!(verify_all(&items), Ok(()));
    }

    #[test]
    fn weak_keys_are_rejected() {
        // The identity point: a small-order key any signature could "verify" under.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let w = SigningKey::from_bytes(&[1; 32]);
        let c = SigningKey::from_bytes(&[2; 32]);
        let r = receipt(&w);
        let sig = sign_receipt(&w, &r).expect("sign");
        let mut cr = countersign(&c, r, sig, 1, 1).expect("countersign");
        cr.coordinator_key = PublicKey(identity);
        assert_eq!(
            verify_receipt(&cr),
            Err(ReceiptError::WeakKey { who: "coordinator" })
        );
    }
}
