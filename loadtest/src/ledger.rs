//! `troop-loadtest ledger`: drives the real log writer and fold with synthetic
//! but fully valid traffic — accounts, grants, holds placed then settled (with
//! real worker- and coordinator-signed receipts) or voided.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rayon::prelude::*;
use troop_ledger::fold::Ledger;
use troop_ledger::note::NoteSigner;
use troop_ledger::receipt::{countersign, public_key, sign_receipt};
use troop_ledger::store::DirStore;
use troop_ledger::writer::LogWriter;
use troop_schemas::{
    AccountId, AccountRole, CreditsMicro, Digest, Event, HoldId, JobId, KeyRole, ModelPrice,
    Receipt, VoidReason, WorkerId, encode_entry,
};

#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    /// Directory to write `log/` and `vkey` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Settled receipts to generate (voided holds come on top).
    #[arg(long)]
    pub receipts: u64,
    #[arg(long, default_value_t = 1000)]
    pub accounts: u64,
    #[arg(long, default_value_t = 100)]
    pub workers: u64,
    /// Seed for the traffic (keys are derived from it too): same seed, same log.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Publish a signed checkpoint every this many entries.
    #[arg(long, default_value_t = 65_536)]
    pub checkpoint_every: u64,
    /// Origin line and key name of the log.
    #[arg(long, default_value = "troop.example/ledger")]
    pub origin: String,
}

const MODELS: [(&str, u64, u64); 3] = [
    ("smollm2-135m", 100, 200),
    ("llama-3.1-8b", 500, 1500),
    ("qwen2.5-32b", 2000, 6000),
];
const FEE_BPS: u64 = 500;
/// Receipts signed per parallel step.
const CHUNK: usize = 4096;
/// One void for every this many settlements.
const VOID_EVERY: u64 = 10;

fn key(seed: u64, role: &str, i: u64) -> SigningKey {
    let mut h = blake3::Hasher::new_derive_key("troop loadtest key v1");
    h.update(&seed.to_le_bytes());
    h.update(role.as_bytes());
    h.update(&i.to_le_bytes());
    SigningKey::from_bytes(h.finalize().as_bytes())
}

fn micro(v: u64) -> CreditsMicro {
    CreditsMicro::new(v).expect("loadtest amounts are small")
}

/// A hold to settle or void: everything but the signatures.
struct Job {
    hold_event: Event,
    settle: Option<(usize, Receipt, u64, u64)>,
    void_at_ms: u64,
}

struct Writer {
    log: LogWriter<DirStore>,
    fold: Ledger,
    checkpoint_every: u64,
    write_secs: f64,
    checkpoints: u64,
}

impl Writer {
    fn push(&mut self, event: &Event) -> Result<()> {
        // The fold is the coordinator's own check before anything is logged.
        self.fold
            .apply(event)
            .with_context(|| format!("generated an invalid {} event", event.kind()))?;
        let bytes = encode_entry(event)?;
        let t = Instant::now();
        self.log.append(bytes)?;
        if self.log.size().is_multiple_of(self.checkpoint_every) {
            self.log.publish()?;
            self.checkpoints += 1;
        }
        self.write_secs += t.elapsed().as_secs_f64();
        Ok(())
    }
}

pub fn run(args: &LedgerArgs) -> Result<serde_json::Value> {
    ensure!(
        args.accounts > 0 && args.workers > 0,
        "need at least one account and one worker"
    );
    ensure!(
        args.checkpoint_every > 0,
        "--checkpoint-every must be positive"
    );
    let started = Instant::now();
    let log_dir = args.out.join("log");
    ensure!(
        !log_dir.join("checkpoint").exists(),
        "{} already holds a log",
        log_dir.display()
    );
    let log_key = key(args.seed, "log", 0);
    let signer = NoteSigner::new(&args.origin, log_key.clone())?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("vkey"),
        format!("{}\n", signer.verifier().to_key_string()),
    )?;
    let coordinator = key(args.seed, "coordinator", 0);
    let mut w = Writer {
        log: LogWriter::open(DirStore::open(&log_dir)?, signer)?,
        fold: Ledger::new(),
        checkpoint_every: args.checkpoint_every,
        write_secs: 0.0,
        checkpoints: 0,
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut now_ms: u64 = 1_790_000_000_000;

    w.push(&Event::KeyRotated {
        role: KeyRole::Log,
        name: args.origin.clone(),
        key: public_key(&log_key),
        at_ms: now_ms,
    })?;
    w.push(&Event::KeyRotated {
        role: KeyRole::Coordinator,
        name: "coordinator-1".into(),
        key: public_key(&coordinator),
        at_ms: now_ms,
    })?;
    w.push(&Event::PriceSchedulePublished {
        version: 1,
        fee_bps: FEE_BPS,
        prices: MODELS
            .iter()
            .map(|(m, i, o)| ModelPrice {
                model: (*m).into(),
                input_micro_per_1k: micro(*i),
                output_micro_per_1k: micro(*o),
            })
            .collect(),
        at_ms: now_ms,
    })?;
    let consumers: Vec<AccountId> = (0..args.accounts)
        .map(|i| AccountId::derive(format!("consumer-{}-{i}", args.seed).as_bytes()))
        .collect();
    let grant = 1_000 * CreditsMicro::PER_CREDIT;
    for a in &consumers {
        w.push(&Event::AccountOpened {
            account: *a,
            role: AccountRole::Consumer,
            at_ms: now_ms,
        })?;
        w.push(&Event::Grant {
            account: *a,
            amount_micro: micro(grant),
            memo: "loadtest grant".into(),
            at_ms: now_ms,
        })?;
    }
    let worker_keys: Vec<SigningKey> = (0..args.workers)
        .map(|i| key(args.seed, "worker", i))
        .collect();
    for k in &worker_keys {
        let pk = public_key(k);
        let account = AccountId::derive(&pk.0);
        w.push(&Event::AccountOpened {
            account,
            role: AccountRole::Worker,
            at_ms: now_ms,
        })?;
        w.push(&Event::WorkerRegistered {
            worker: WorkerId::from_key(&pk),
            key: pk,
            account,
            at_ms: now_ms,
        })?;
    }

    let mut settled = 0u64;
    let mut voided = 0u64;
    let mut job_no = 0u64;
    let schedule = w
        .fold
        .schedule()
        .context("schedule published above")?
        .clone();
    while settled < args.receipts {
        // Decide a chunk of jobs sequentially (cheap), sign in parallel (costly).
        let mut jobs = Vec::with_capacity(CHUNK);
        while jobs.len() < CHUNK && settled < args.receipts {
            job_no += 1;
            now_ms += 1;
            let consumer = consumers[rng.gen_range(0..consumers.len())];
            let (model, _, _) = MODELS[rng.gen_range(0..MODELS.len())];
            let input_tokens = rng.gen_range(10..2000);
            let max_tokens = rng.gen_range(16..1024);
            let amount = schedule.estimate(model, input_tokens, max_tokens)?;
            let available = w.fold.account(&consumer).context("opened")?.available();
            if available < i128::from(amount) + i128::from(grant) {
                // Top up well before the balance could run short of a hold.
                w.push(&Event::Grant {
                    account: consumer,
                    amount_micro: micro(grant),
                    memo: "top-up".into(),
                    at_ms: now_ms,
                })?;
            }
            let hold = HoldId::derive(format!("hold-{}-{job_no}", args.seed).as_bytes());
            let job = JobId::derive(format!("job-{}-{job_no}", args.seed).as_bytes());
            let hold_event = Event::HoldPlaced {
                hold,
                job,
                account: consumer,
                model: model.into(),
                amount_micro: micro(amount),
                expires_at_ms: now_ms + 600_000,
                schedule_version: schedule.version,
                at_ms: now_ms,
                origin: None,
            };
            w.push(&hold_event)?;
            let settle = if job_no.is_multiple_of(VOID_EVERY) {
                voided += 1;
                None
            } else {
                settled += 1;
                let wi = rng.gen_range(0..worker_keys.len());
                let pk = public_key(&worker_keys[wi]);
                let output_tokens = rng.gen_range(1..=max_tokens);
                let receipt = Receipt {
                    job,
                    hold,
                    consumer,
                    worker: WorkerId::from_key(&pk),
                    worker_key: pk,
                    model: model.into(),
                    input_tokens,
                    output_tokens,
                    request_digest: Digest::of(&job_no.to_le_bytes()),
                    response_digest: Digest::of(&(!job_no).to_le_bytes()),
                    started_at_ms: now_ms,
                    finished_at_ms: now_ms + rng.gen_range(100..5000),
                };
                Some((wi, receipt, input_tokens, output_tokens))
            };
            jobs.push(Job {
                hold_event,
                settle,
                void_at_ms: now_ms + 1,
            });
        }
        let resolved: Vec<Result<Event>> = jobs
            .into_par_iter()
            .map(|job| {
                let Event::HoldPlaced {
                    hold,
                    model,
                    amount_micro,
                    ..
                } = &job.hold_event
                else {
                    unreachable!("built above")
                };
                let Some((wi, receipt, billed_in, billed_out)) = job.settle else {
                    return Ok(Event::HoldVoided {
                        hold: *hold,
                        reason: VoidReason::Failed,
                        at_ms: job.void_at_ms,
                    });
                };
                let at_ms = receipt.finished_at_ms;
                let sig = sign_receipt(&worker_keys[wi], &receipt)?;
                let signed = countersign(&coordinator, receipt, sig, billed_in, billed_out)?;
                let c = schedule.charge(model, billed_in, billed_out, *amount_micro)?;
                Ok(Event::HoldSettled {
                    hold: *hold,
                    receipt: signed,
                    charged_micro: micro(c.charged),
                    worker_earned_micro: micro(c.earned),
                    fee_micro: micro(c.fee),
                    at_ms,
                })
            })
            .collect();
        for e in resolved {
            w.push(&e?)?;
        }
        if settled % (CHUNK as u64 * 25) < CHUNK as u64 {
            let snapshot = w.fold.snapshot(now_ms);
            w.push(&snapshot)?;
        }
    }
    let snapshot = w.fold.snapshot(now_ms);
    w.push(&snapshot)?;
    let t = Instant::now();
    let cp = w.log.publish()?.clone();
    w.write_secs += t.elapsed().as_secs_f64();
    w.fold.check_invariants().map_err(anyhow::Error::msg)?;
    let total = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "entries": cp.size,
        "receipts": settled,
        "voided": voided,
        "root": cp.root.to_base64(),
        "checkpoints": w.checkpoints + 1,
        "write_seconds": w.write_secs,
        "entries_per_s": (cp.size as f64 / w.write_secs).round(),
        "total_seconds": total,
        "log": log_dir.display().to_string(),
        "vkey": args.out.join("vkey").display().to_string(),
    }))
}
