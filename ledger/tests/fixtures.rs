//! Golden fixtures: one canonical entry per event kind and version, under
//! `schemas/fixtures/v<N>/<kind>.json`. The bytes must never change for a
//! released version; `TROOP_BLESS=1 cargo test` rewrites them when a new
//! version is added on purpose.

mod common;

use std::path::PathBuf;

use common::*;
use troop_ledger::fold::Ledger;
use troop_ledger::receipt::verify_receipt;
use troop_schemas::{AccountId, CreditsMicro, Event, HoldId, decode_entry, encode_entry};

fn one_of_each() -> Vec<Event> {
    let mut ledger = Ledger::new();
    let mut events = genesis();
    for e in &events {
        ledger.apply(e).expect("genesis");
    }
    let mut push = |ledger: &mut Ledger, e: Event| {
        ledger.apply(&e).expect("valid");
        events.push(e);
    };
    push(&mut ledger, hold(1, 5_000));
    let s = settle(&ledger, 1, 120, 40);
    push(&mut ledger, s);
    push(&mut ledger, hold(2, 5_000));
    push(&mut ledger, void(2));
    push(&mut ledger, hold(3, 5_000));
    push(
        &mut ledger,
        Event::HoldExpired {
            hold: HoldId::derive(&3u64.to_le_bytes()),
            at_ms: T0 + 3 + 60_000,
        },
    );
    push(
        &mut ledger,
        Event::Transfer {
            from: consumer(),
            to: worker_account(),
            amount_micro: CreditsMicro::new(1).expect("1"),
            memo: "tip \"quoted\" \u{1} é".into(),
            at_ms: T0 + 70_000,
        },
    );
    push(
        &mut ledger,
        Event::UptimeReward {
            worker: worker_id(),
            epoch: 42,
            heartbeats: 360,
            amount_micro: m(2_500),
            at_ms: T0 + 80_000,
        },
    );
    let snap = ledger.snapshot(T0 + 90_000);
    push(&mut ledger, snap);
    let _ = AccountId::TREASURY;
    events
}

#[test]
fn every_kind_has_a_golden_fixture_that_round_trips() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/fixtures/v1");
    let bless = std::env::var_os("TROOP_BLESS").is_some();
    let mut seen = std::collections::BTreeSet::new();
    for event in one_of_each() {
        let kind = event.kind();
        if !seen.insert(kind) {
            continue;
        }
        let bytes = encode_entry(&event).expect("encodes");
        let path = dir.join(format!("{kind}.json"));
        if bless {
            std::fs::write(&path, &bytes).expect("write fixture");
        }
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (TROOP_BLESS=1 creates it)", path.display()));
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&golden),
            "{kind} encoding changed"
        );
        assert_eq!(decode_entry(&golden).expect("decodes"), event);
        if let Event::HoldSettled { receipt, .. } = &event {
            verify_receipt(receipt).expect("fixture receipt is validly signed");
        }
    }
    let all: std::collections::BTreeSet<&str> = Event::KINDS.into_iter().collect();
    assert_eq!(seen, all, "a kind has no fixture");
}
