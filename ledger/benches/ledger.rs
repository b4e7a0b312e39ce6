//! Benchmarks of the ledger's hot paths, each against a baseline measured in
//! the same run (see BENCHMARKS.md):
//! - append + integrate vs the bare SHA-256 leaf hashing of the same entries;
//! - batch receipt verification vs one-by-one strict verification;
//! - entry decoding (canonical check + schema) vs plain `serde_json` parsing.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use troop_ledger::hash::leaf_hash;
use troop_ledger::note::NoteSigner;
use troop_ledger::receipt::{
    SignedMessage, countersign, public_key, receipt_signatures, sign_receipt, verify_batch,
};
use troop_ledger::store::MemStore;
use troop_ledger::writer::LogWriter;
use troop_schemas::{
    AccountId, CountersignedReceipt, CreditsMicro, Digest, Event, HoldId, JobId, Receipt, WorkerId,
    decode_entry, encode_entry,
};

fn settled(i: u64) -> Event {
    let w = SigningKey::from_bytes(&[7; 32]);
    let c = SigningKey::from_bytes(&[8; 32]);
    let pk = public_key(&w);
    let receipt = Receipt {
        job: JobId::derive(&i.to_le_bytes()),
        hold: HoldId::derive(&i.to_le_bytes()),
        consumer: AccountId::derive(b"consumer"),
        worker: WorkerId::from_key(&pk),
        worker_key: pk,
        model: "llama-3.1-8b".into(),
        input_tokens: 800 + i % 100,
        output_tokens: 300 + i % 50,
        request_digest: Digest::of(&i.to_le_bytes()),
        response_digest: Digest::of(&(!i).to_le_bytes()),
        started_at_ms: 1_790_000_000_000 + i,
        finished_at_ms: 1_790_000_001_000 + i,
    };
    let sig = sign_receipt(&w, &receipt).expect("sign");
    let r: CountersignedReceipt = countersign(&c, receipt, sig, 800, 300).expect("countersign");
    let m = |v| CreditsMicro::new(v).expect("small");
    Event::HoldSettled {
        hold: HoldId::derive(&i.to_le_bytes()),
        receipt: r,
        charged_micro: m(850),
        worker_earned_micro: m(808),
        fee_micro: m(42),
        at_ms: 1,
    }
}

fn entries(n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| encode_entry(&settled(i % 64)).expect("encode"))
        .collect()
}

fn append_integrate(c: &mut Criterion) {
    const N: u64 = 65_536;
    let batch = entries(N);
    let mut g = c.benchmark_group("append_integrate");
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    g.bench_function("baseline_leaf_hash_only", |b| {
        b.iter(|| {
            batch
                .iter()
                .map(|e| leaf_hash(e))
                .fold(0u8, |acc, h| acc ^ h.0[0])
        })
    });
    g.bench_function("writer_mem_store", |b| {
        b.iter_batched(
            || {
                let signer = NoteSigner::new("bench.example/log", SigningKey::from_bytes(&[1; 32]))
                    .expect("signer");
                (
                    LogWriter::open(MemStore::default(), signer).expect("open"),
                    batch.clone(),
                )
            },
            |(mut w, batch)| {
                for e in batch {
                    w.append(e).expect("append");
                }
                w.publish().expect("publish").size
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn receipt_verification(c: &mut Criterion) {
    let sigs: Vec<SignedMessage> = (0..2048u64)
        .flat_map(|i| match settled(i) {
            Event::HoldSettled { receipt, .. } => receipt_signatures(&receipt).expect("structure"),
            _ => unreachable!(),
        })
        .collect();
    let mut g = c.benchmark_group("receipt_signatures");
    g.throughput(Throughput::Elements(sigs.len() as u64));
    g.bench_function(
        BenchmarkId::new("baseline_strict_one_by_one", sigs.len()),
        |b| b.iter(|| sigs.iter().all(|s| s.verify_strict().is_ok())),
    );
    for size in [64, 256, 1024, 4096] {
        g.bench_function(BenchmarkId::new("batch", size), |b| {
            b.iter(|| sigs.chunks(size).all(|c| verify_batch(c).is_ok()))
        });
    }
    g.finish();
}

fn entry_decoding(c: &mut Criterion) {
    let batch = entries(1024);
    let mut g = c.benchmark_group("entry_decode");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            batch
                .iter()
                .filter(|e| serde_json::from_slice::<serde_json::Value>(e).is_ok())
                .count()
        })
    });
    g.bench_function("decode_entry", |b| {
        b.iter(|| batch.iter().filter(|e| decode_entry(e).is_ok()).count())
    });
    g.bench_function("receipt_signing_bytes", |b| {
        let events: Vec<Event> = batch
            .iter()
            .map(|e| decode_entry(e).expect("valid"))
            .collect();
        b.iter(|| {
            events
                .iter()
                .map(|e| match e {
                    Event::HoldSettled { receipt, .. } => {
                        receipt_signatures(receipt).map(|s| s.len()).unwrap_or(0)
                    }
                    _ => 0,
                })
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    append_integrate,
    receipt_verification,
    entry_decoding
);
criterion_main!(benches);
