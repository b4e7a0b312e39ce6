//! Deterministic ledger traffic for integration tests: fixed keys, fixed clock.
#![allow(dead_code, reason = "each test binary uses a different part")]

use ed25519_dalek::SigningKey;
use troop_ledger::fold::Ledger;
use troop_ledger::receipt::{countersign, public_key, sign_receipt};
use troop_schemas::{
    AccountId, AccountRole, CreditsMicro, Digest, Event, HoldId, JobId, KeyRole, ModelPrice,
    Receipt, VoidReason, WorkerId,
};

pub const T0: u64 = 1_790_000_000_000;
pub const MODEL: &str = "smollm2-135m";

pub fn m(v: u64) -> CreditsMicro {
    CreditsMicro::new(v).expect("small amount")
}

pub fn log_key() -> SigningKey {
    SigningKey::from_bytes(&[11; 32])
}
pub fn coordinator_key() -> SigningKey {
    SigningKey::from_bytes(&[12; 32])
}
pub fn worker_key() -> SigningKey {
    SigningKey::from_bytes(&[13; 32])
}
pub fn consumer() -> AccountId {
    AccountId::derive(b"consumer")
}
pub fn worker_account() -> AccountId {
    AccountId::derive(b"worker account")
}
pub fn worker_id() -> WorkerId {
    WorkerId::from_key(&public_key(&worker_key()))
}

pub fn genesis() -> Vec<Event> {
    let wk = public_key(&worker_key());
    vec![
        Event::KeyRotated {
            role: KeyRole::Log,
            name: "test.example/log".into(),
            key: public_key(&log_key()),
            at_ms: T0,
        },
        Event::KeyRotated {
            role: KeyRole::Coordinator,
            name: "coordinator-1".into(),
            key: public_key(&coordinator_key()),
            at_ms: T0,
        },
        Event::PriceSchedulePublished {
            version: 1,
            fee_bps: 500,
            prices: vec![ModelPrice {
                model: MODEL.into(),
                input_micro_per_1k: m(100),
                output_micro_per_1k: m(200),
            }],
            at_ms: T0,
        },
        Event::AccountOpened {
            account: consumer(),
            role: AccountRole::Consumer,
            at_ms: T0,
        },
        Event::AccountOpened {
            account: worker_account(),
            role: AccountRole::Worker,
            at_ms: T0,
        },
        Event::WorkerRegistered {
            worker: worker_id(),
            key: wk,
            account: worker_account(),
            at_ms: T0,
        },
        Event::Grant {
            account: consumer(),
            amount_micro: m(10_000_000),
            memo: "welcome".into(),
            at_ms: T0,
        },
    ]
}

pub fn hold(n: u64, amount: u64) -> Event {
    Event::HoldPlaced {
        hold: HoldId::derive(&n.to_le_bytes()),
        job: JobId::derive(&n.to_le_bytes()),
        account: consumer(),
        model: MODEL.into(),
        amount_micro: m(amount),
        expires_at_ms: T0 + n + 60_000,
        schedule_version: 1,
        at_ms: T0 + n,
        origin: None,
    }
}

/// A correctly signed and priced settlement of hold `n`.
pub fn settle(ledger: &Ledger, n: u64, input: u64, output: u64) -> Event {
    settle_countersigned_by(ledger, n, input, output, &coordinator_key())
}

/// [`settle`], countersigned by `coordinator` and charged at the hold's schedule.
pub fn settle_countersigned_by(
    ledger: &Ledger,
    n: u64,
    input: u64,
    output: u64,
    coordinator: &SigningKey,
) -> Event {
    let h = ledger
        .hold(&HoldId::derive(&n.to_le_bytes()))
        .expect("hold is open");
    let wk = public_key(&worker_key());
    let receipt = Receipt {
        consumer: consumer(),
        finished_at_ms: T0 + n + 900,
        hold: HoldId::derive(&n.to_le_bytes()),
        input_tokens: input,
        job: h.job,
        model: MODEL.into(),
        output_tokens: output,
        request_digest: Digest::of(b"request"),
        response_digest: Digest::of(b"response"),
        started_at_ms: T0 + n,
        worker: WorkerId::from_key(&wk),
        worker_key: wk,
    };
    let sig = sign_receipt(&worker_key(), &receipt).expect("sign");
    let signed = countersign(coordinator, receipt, sig, input, output).expect("countersign");
    let c = ledger
        .schedule_version(h.schedule_version)
        .expect("the hold's schedule")
        .charge(MODEL, input, output, h.amount)
        .expect("priced");
    Event::HoldSettled {
        hold: HoldId::derive(&n.to_le_bytes()),
        receipt: signed,
        charged_micro: m(c.charged),
        worker_earned_micro: m(c.earned),
        fee_micro: m(c.fee),
        at_ms: T0 + n + 1000,
    }
}

pub fn void(n: u64) -> Event {
    Event::HoldVoided {
        hold: HoldId::derive(&n.to_le_bytes()),
        reason: VoidReason::Failed,
        at_ms: T0 + n + 10,
    }
}

/// Genesis plus `holds` holds, every third voided, the rest settled.
pub fn traffic(holds: u64) -> Vec<Event> {
    let mut ledger = Ledger::new();
    let mut out = Vec::new();
    let mut push = |ledger: &mut Ledger, e: Event| {
        ledger.apply(&e).expect("valid traffic");
        out.push(e);
    };
    for e in genesis() {
        push(&mut ledger, e);
    }
    for n in 1..=holds {
        push(&mut ledger, hold(n, 5_000));
        let e = if n % 3 == 0 {
            void(n)
        } else {
            settle(&ledger, n, 100 + n % 50, 1 + n % 200)
        };
        push(&mut ledger, e);
    }
    out
}
