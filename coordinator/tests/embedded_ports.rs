//! The embedded books behind the `Money` and `Reads` ports pass their suites
//! (the cluster's adapters pass the same ones in `cluster_owner.rs`), and the
//! embedded worker history the history suite (`cluster_history.rs` for Kafka).

use troop_coordinator::config::{Config, PriceConfig};
use troop_coordinator::server::{AppState, open_state};
use troop_coordinator::{money, reads};
use troop_ledger::note::NoteVerifier;
use troop_schemas::{AccountId, WorkerId};

/// Runs `test` on the books of a fresh data directory whose configured
/// prices (model `m`) are schedule version 1.
fn with_books(test: impl AsyncFnOnce(&AppState, money::conformance::Fixture<'_>, NoteVerifier)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: dir.path().to_owned(),
        prices: vec![PriceConfig {
            model: "m".into(),
            input_micro_per_1k: 1_000,
            output_micro_per_1k: 3_000,
        }],
        ..Config::default()
    };
    actix_web::rt::System::new().block_on(async move {
        let state = open_state(config).expect("opens");
        let vkey = std::fs::read_to_string(dir.path().join("ledger.vkey")).expect("ledger.vkey");
        let verifier = NoteVerifier::from_key_string(vkey.trim()).expect("a verifier key");
        let fixture = money::conformance::Fixture {
            money: &*state.money,
            model: "m",
            schedule_version: 1,
            at_ms: 1_790_000_000_000,
        };
        test(&state, fixture, verifier).await;
    });
}

#[test]
fn the_embedded_books_pass_the_money_suite() {
    with_books(async |_, fixture, _| {
        money::conformance::run_all(fixture, &|test| {
            AccountId::derive(format!("embedded-{test}").as_bytes())
        })
        .await;
    });
}

#[test]
fn the_embedded_books_pass_the_reads_suite() {
    with_books(async |state, books, verifier| {
        let schedule = state.schedule.get().expect("the configured prices");
        let fixture = reads::conformance::Fixture {
            books,
            reads: &*state.reads,
            schedule: &schedule,
            coordinator: &state.coordinator_key,
            verifier: &verifier,
        };
        reads::conformance::run_all(fixture, &|test| {
            AccountId::derive(format!("embedded-{test}").as_bytes())
        })
        .await;
    });
}

#[test]
fn the_embedded_history_passes_the_history_suite() {
    with_books(async |state, _, _| {
        troop_coordinator::history::conformance::run_all(&*state.worker_events.log, &|test| {
            WorkerId::derive(format!("embedded-{test}").as_bytes())
        })
        .await;
    });
}
