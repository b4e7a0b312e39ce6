//! The double-entry fold under random event sequences, and its refusals.

mod common;

use common::*;
use proptest::prelude::*;
use troop_ledger::fold::{FoldError, Ledger};
use troop_schemas::{AccountId, AccountRole, Event, HoldId};

#[derive(Debug, Clone)]
enum Op {
    Open(u8),
    Grant(u8, u64),
    Hold(u8, u64),
    Settle(u8, u64, u64),
    Void(u8),
    Expire(u8, u64),
    Transfer(u8, u8, u64),
    Reward(u64, u64),
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Open),
        (0u8..6, 0u64..50_000).prop_map(|(a, x)| Op::Grant(a, x)),
        (0u8..6, 0u64..30_000).prop_map(|(a, x)| Op::Hold(a, x)),
        (0u8..40, 0u64..5_000, 0u64..5_000).prop_map(|(h, i, o)| Op::Settle(h, i, o)),
        (0u8..40).prop_map(Op::Void),
        (0u8..40, 0u64..120_000).prop_map(|(h, d)| Op::Expire(h, d)),
        (0u8..6, 0u8..6, 0u64..20_000).prop_map(|(a, b, x)| Op::Transfer(a, b, x)),
        (0u64..4, 0u64..1_000).prop_map(|(e, x)| Op::Reward(e, x)),
        Just(Op::Snapshot),
    ]
}

fn acct(i: u8) -> AccountId {
    if i == 0 {
        consumer()
    } else {
        AccountId::derive(&[i])
    }
}

/// Turns an op into an event, valid or not: the fold must sort them out.
fn event(ledger: &Ledger, op: &Op, n: u64) -> Event {
    let hold_id = |h: u8| HoldId::derive(&u64::from(h).to_le_bytes());
    match *op {
        Op::Open(a) => Event::AccountOpened {
            account: acct(a),
            role: AccountRole::Consumer,
            at_ms: T0 + n,
        },
        Op::Grant(a, x) => Event::Grant {
            account: acct(a),
            amount_micro: m(x),
            memo: String::new(),
            at_ms: T0 + n,
        },
        Op::Hold(a, x) => {
            let mut e = hold(n % 40, x);
            if let Event::HoldPlaced { account, .. } = &mut e {
                *account = acct(a);
            }
            e
        }
        Op::Settle(h, i, o) => {
            let id = hold_id(h);
            match ledger.hold(&id) {
                // A correctly priced settlement when the hold's account is the fixture consumer.
                Some(open) if open.account == consumer() => settle(ledger, u64::from(h), i, o),
                _ => Event::HoldVoided {
                    hold: id,
                    reason: troop_schemas::VoidReason::Empty,
                    at_ms: T0 + n,
                },
            }
        }
        Op::Void(h) => void(u64::from(h)),
        Op::Expire(h, d) => Event::HoldExpired {
            hold: hold_id(h),
            at_ms: T0 + u64::from(h) + d,
        },
        Op::Transfer(a, b, x) => Event::Transfer {
            from: acct(a),
            to: acct(b),
            amount_micro: m(x),
            memo: String::new(),
            at_ms: T0 + n,
        },
        Op::Reward(e, x) => Event::UptimeReward {
            worker: worker_id(),
            epoch: e,
            heartbeats: 1,
            amount_micro: m(x),
            at_ms: T0 + n,
        },
        Op::Snapshot => ledger.snapshot(T0 + n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn invariants_hold_and_replay_reproduces_the_state(ops in proptest::collection::vec(op(), 1..200)) {
        let mut ledger = Ledger::new();
        let mut accepted = Vec::new();
        for e in genesis() {
            ledger.apply(&e).expect("genesis");
            accepted.push(e);
        }
        for (n, op) in ops.iter().enumerate() {
            let e = event(&ledger, op, n as u64);
            let before = ledger.clone();
            match ledger.apply(&e) {
                Ok(()) => accepted.push(e),
                Err(_) => prop_assert_eq!(&ledger, &before, "a refused event changed the state"),
            }
            prop_assert!(ledger.check_invariants().is_ok(), "{:?}", ledger.check_invariants());
        }
        let mut replayed = Ledger::new();
        for e in &accepted {
            replayed.apply(e).expect("accepted events replay");
        }
        prop_assert_eq!(replayed.balances_digest(), ledger.balances_digest());
        prop_assert_eq!(&replayed, &ledger);
    }
}

fn funded() -> Ledger {
    let mut l = Ledger::new();
    for e in genesis() {
        l.apply(&e).expect("genesis");
    }
    l
}

#[test]
fn a_hold_settles_exactly_once() {
    let mut l = funded();
    l.apply(&hold(1, 5_000)).expect("hold");
    let s = settle(&l, 1, 100, 50);
    l.apply(&s).expect("first settlement");
    assert_eq!(
        l.apply(&s),
        Err(FoldError::HoldNotOpen(HoldId::derive(&1u64.to_le_bytes())))
    );
    assert!(matches!(l.apply(&void(1)), Err(FoldError::HoldNotOpen(_))));
    // Nor can the id be reused for a new hold.
    assert!(matches!(
        l.apply(&hold(1, 10)),
        Err(FoldError::DuplicateHold(_))
    ));
}

#[test]
fn overdrafts_are_refused() {
    let mut l = funded();
    let all = l.account(&consumer()).expect("consumer").available();
    let too_much = u64::try_from(all).expect("positive") + 1;
    assert!(matches!(
        l.apply(&hold(1, too_much)),
        Err(FoldError::InsufficientFunds { .. })
    ));
    l.apply(&hold(2, too_much - 1))
        .expect("everything but one micro-credit");
    let t = Event::Transfer {
        from: consumer(),
        to: worker_account(),
        amount_micro: m(2),
        memo: String::new(),
        at_ms: T0,
    };
    assert!(
        matches!(l.apply(&t), Err(FoldError::InsufficientFunds { .. })),
        "held credits are not spendable"
    );
    l.check_invariants().expect("invariants");
}

#[test]
fn settlements_must_be_priced_and_signed_by_the_right_keys() {
    let mut l = funded();
    l.apply(&hold(1, 5_000)).expect("hold");
    let good = settle(&l, 1, 1_000, 1_000);
    let Event::HoldSettled {
        hold,
        receipt,
        charged_micro,
        worker_earned_micro,
        fee_micro,
        at_ms,
    } = good.clone()
    else {
        unreachable!()
    };
    // 1000 in × 100/1k + 1000 out × 200/1k = 300 µc, fee 5% = 15.
    assert_eq!(
        (
            charged_micro.get(),
            fee_micro.get(),
            worker_earned_micro.get()
        ),
        (300, 15, 285)
    );
    let overcharge = Event::HoldSettled {
        charged_micro: m(301),
        worker_earned_micro: m(286),
        receipt: receipt.clone(),
        hold,
        fee_micro,
        at_ms,
    };
    assert!(matches!(
        l.apply(&overcharge),
        Err(FoldError::WrongSettlement { .. })
    ));
    let mut foreign = receipt.clone();
    foreign.coordinator_key = troop_schemas::PublicKey([9; 32]);
    let e = Event::HoldSettled {
        receipt: foreign,
        hold,
        charged_micro,
        worker_earned_micro,
        fee_micro,
        at_ms,
    };
    assert_eq!(l.apply(&e), Err(FoldError::WrongCoordinatorKey));
    let mut other_consumer = receipt;
    other_consumer.receipt.consumer = AccountId::derive(b"someone else");
    let e = Event::HoldSettled {
        receipt: other_consumer,
        hold,
        charged_micro,
        worker_earned_micro,
        fee_micro,
        at_ms,
    };
    assert_eq!(l.apply(&e), Err(FoldError::ReceiptMismatch("consumer")));
    l.apply(&good).expect("the honest settlement");
    let w = l.account(&worker_account()).expect("worker");
    assert_eq!(w.balance(), 285);
    l.check_invariants().expect("invariants");
}

#[test]
fn the_charge_is_capped_at_the_hold_and_empty_responses_are_voided() {
    let mut l = funded();
    l.apply(&hold(1, 50)).expect("small hold");
    let capped = settle(&l, 1, 10_000, 10_000);
    let Event::HoldSettled { charged_micro, .. } = &capped else {
        unreachable!()
    };
    assert_eq!(charged_micro.get(), 50, "never more than reserved");
    l.apply(&capped).expect("capped settlement");
    l.apply(&hold(2, 500)).expect("hold");
    assert_eq!(
        l.apply(&settle(&l, 2, 10, 0)),
        Err(FoldError::EmptySettlement)
    );
}

#[test]
fn expiry_is_an_event_checked_against_the_deadline() {
    let mut l = funded();
    l.apply(&hold(1, 500)).expect("hold");
    let early = Event::HoldExpired {
        hold: HoldId::derive(&1u64.to_le_bytes()),
        at_ms: T0 + 1 + 59_999,
    };
    assert!(matches!(
        l.apply(&early),
        Err(FoldError::ExpiredTooEarly { .. })
    ));
    let due = Event::HoldExpired {
        hold: HoldId::derive(&1u64.to_le_bytes()),
        at_ms: T0 + 1 + 60_000,
    };
    l.apply(&due).expect("expired at the deadline");
    assert_eq!(l.account(&consumer()).expect("c").debits_pending, 0);
}

#[test]
fn snapshots_must_match_the_replayed_state() {
    let mut l = funded();
    let snap = l.snapshot(T0);
    l.apply(&snap).expect("true snapshot");
    let Event::BalanceSnapshot {
        accounts,
        open_holds,
        pending_micro,
        at_ms,
        ..
    } = snap
    else {
        unreachable!()
    };
    let forged = Event::BalanceSnapshot {
        accounts,
        open_holds,
        pending_micro,
        at_ms,
        balances_digest: troop_schemas::Digest::of(b"x"),
    };
    assert_eq!(l.apply(&forged), Err(FoldError::SnapshotMismatch));
}

fn schedule(version: u64, fee_bps: u64, prices: &[(&str, u64, u64)]) -> Event {
    Event::PriceSchedulePublished {
        version,
        fee_bps,
        prices: prices
            .iter()
            .map(|(model, input, output)| troop_schemas::ModelPrice {
                model: (*model).into(),
                input_micro_per_1k: m(*input),
                output_micro_per_1k: m(*output),
            })
            .collect(),
        at_ms: T0 + 5,
    }
}

fn hold_at(n: u64, amount: u64, version: u64) -> Event {
    let mut e = hold(n, amount);
    if let Event::HoldPlaced {
        schedule_version, ..
    } = &mut e
    {
        *schedule_version = version;
    }
    e
}

#[test]
fn a_hold_is_settled_at_the_schedule_it_was_priced_at() {
    let mut l = funded();
    l.apply(&hold(1, 5_000)).expect("hold at version 1");
    l.apply(&schedule(2, 1_000, &[(MODEL, 1_000, 2_000)]))
        .expect("version 2: ten times the price, twice the fee");
    let at_v1 = settle(&l, 1, 1_000, 1_000);
    let Event::HoldSettled {
        hold,
        receipt,
        charged_micro,
        fee_micro,
        at_ms,
        ..
    } = at_v1.clone()
    else {
        unreachable!()
    };
    // Version 1's prices and fee, though version 2 is in force.
    assert_eq!((charged_micro.get(), fee_micro.get()), (300, 15));
    let at_v2 = Event::HoldSettled {
        hold,
        receipt,
        charged_micro: m(3_000),
        worker_earned_micro: m(2_700),
        fee_micro: m(300),
        at_ms,
    };
    assert!(matches!(
        l.apply(&at_v2),
        Err(FoldError::WrongSettlement { expected: 300, .. })
    ));
    l.apply(&at_v1).expect("charged at the hold's schedule");
    assert_eq!(l.account(&worker_account()).expect("w").balance(), 285);

    // A hold names a published version, and a model that version prices.
    assert_eq!(
        l.apply(&hold_at(2, 500, 3)),
        Err(FoldError::UnknownScheduleVersion(3))
    );
    l.apply(&schedule(3, 500, &[("other-model", 1, 1)]))
        .expect("version 3 drops the model");
    assert_eq!(
        l.apply(&hold_at(2, 500, 3)),
        Err(FoldError::UnknownModel(MODEL.into()))
    );
    assert_eq!(l.holds_priced_stale(), 0);
    l.apply(&hold_at(2, 500, 2))
        .expect("an older version still prices it: valid, reported as stale");
    assert_eq!(l.holds_priced_stale(), 1);
    l.apply(&settle(&l, 2, 10, 10))
        .expect("settled at version 2");
    l.check_invariants().expect("invariants");
}

#[test]
fn a_receipt_may_be_countersigned_by_any_published_coordinator_key() {
    let mut l = funded();
    l.apply(&hold(1, 5_000)).expect("hold");
    l.apply(&hold(2, 5_000)).expect("hold");
    let newer = ed25519_dalek::SigningKey::from_bytes(&[21; 32]);
    assert_eq!(
        l.apply(&settle_countersigned_by(&l, 1, 10, 10, &newer)),
        Err(FoldError::WrongCoordinatorKey),
        "not published yet"
    );
    l.apply(&Event::KeyRotated {
        role: troop_schemas::KeyRole::Coordinator,
        name: "coordinator-2".into(),
        key: troop_ledger::receipt::public_key(&newer),
        at_ms: T0 + 5,
    })
    .expect("rotation");
    l.apply(&settle_countersigned_by(&l, 1, 10, 10, &newer))
        .expect("the new key");
    l.apply(&settle(&l, 2, 10, 10))
        .expect("the retired key: an owner may not have folded the rotation yet");
}

/// The race a cluster owner runs: it judges against its own fold, which may
/// lack a schedule and a key rotation that the sequencer orders before the
/// owner's events. Those events must still fold, to the same charges.
#[test]
fn an_owner_that_has_not_folded_a_new_schedule_or_key_judges_what_the_sequencer_accepts() {
    let mut owner = funded();
    let mut sequencer = funded();
    let newer = ed25519_dalek::SigningKey::from_bytes(&[21; 32]);
    // Published by another partition's owner and sequenced first.
    sequencer
        .apply(&schedule(2, 2_000, &[(MODEL, 5_000, 5_000)]))
        .expect("version 2");
    sequencer
        .apply(&Event::KeyRotated {
            role: troop_schemas::KeyRole::Coordinator,
            name: "coordinator-2".into(),
            key: troop_ledger::receipt::public_key(&newer),
            at_ms: T0 + 5,
        })
        .expect("rotation");
    // The owner's own events, judged at version 1 with the retired key.
    let version = owner.schedule().expect("schedule").version;
    let placed = hold_at(1, 5_000, version);
    owner.apply(&placed).expect("owner places");
    let settled = settle(&owner, 1, 1_000, 1_000);
    owner.apply(&settled).expect("owner settles");

    sequencer.apply(&placed).expect("sequenced hold");
    sequencer.apply(&settled).expect("sequenced settlement");
    let balance = |l: &Ledger, a| l.account(&a).expect("account").balance();
    assert_eq!(balance(&sequencer, consumer()), balance(&owner, consumer()));
    assert_eq!(
        balance(&sequencer, worker_account()),
        balance(&owner, worker_account())
    );
    assert_eq!(sequencer.holds_priced_stale(), 1);
    sequencer.check_invariants().expect("invariants");
}
