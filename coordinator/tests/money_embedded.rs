//! The embedded books behind the `Money` port pass its suite (the cluster's
//! adapter passes the same one in `cluster_owner.rs`).

use troop_coordinator::config::{Config, PriceConfig};
use troop_coordinator::money::conformance::{Fixture, run_all};
use troop_schemas::AccountId;

#[test]
fn the_embedded_books_pass_the_money_suite() {
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
        let state = troop_coordinator::server::open_state(config).expect("opens");
        let fixture = Fixture {
            money: &*state.money,
            model: "m",
            // A fresh data directory: the configured prices are version 1.
            schedule_version: 1,
            at_ms: 1_790_000_000_000,
        };
        run_all(fixture, &|test| {
            AccountId::derive(format!("embedded-{test}").as_bytes())
        })
        .await;
    });
}
