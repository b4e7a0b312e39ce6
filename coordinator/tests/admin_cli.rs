//! Every operator action as a `troop-coordinator admin` subcommand, with
//! `--json`, against a running coordinator process.

mod common;

use std::process::Command;
use std::time::Duration;

use common::harness::{PROCESS_ADMIN, account, start_process, wait_for, wait_for_models};
use common::scripted::Script;
use serde_json::Value;

fn cli(url: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
        .args(["admin", "--url", url, "--json"])
        .args(args)
        .env("TROOP_ADMIN_TOKEN", PROCESS_ADMIN)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn operators_manage_accounts_keys_prices_and_workers_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = start_process(dir.path());
    let url = coordinator.1.clone();

    let acct = cli(&url, &["create-account"])["account"]
        .as_str()
        .expect("account")
        .to_owned();
    cli(
        &url,
        &[
            "grant",
            "--account",
            &acct,
            "--amount-micro",
            "2500000",
            "--memo",
            "welcome",
        ],
    );
    let key = cli(&url, &["create-key", "--account", &acct]);
    let secret = key["secret"]
        .as_str()
        .expect("secret shown once")
        .to_owned();
    assert_eq!(account(&url, &secret)["balance_micro"], "2500000");
    let listed = cli(&url, &["list-accounts"]);
    assert!(
        listed["accounts"]
            .as_array()
            .expect("list")
            .iter()
            .any(|a| a["account"] == acct.as_str() && a["balance_micro"] == "2500000")
    );

    cli(
        &url,
        &["revoke-key", "--key", key["key"].as_str().expect("key id")],
    );
    let refused = ureq::get(&format!("{url}/v1/account"))
        .set("authorization", &format!("Bearer {secret}"))
        .call();
    assert!(
        matches!(refused, Err(ureq::Error::Status(401, _))),
        "a revoked key opens nothing"
    );

    let prices = cli(
        &url,
        &[
            "set-prices",
            "--fee-bps",
            "300",
            "--price",
            "scripted=2000:9000",
            "--price",
            "other=1:2",
        ],
    );
    assert_eq!(prices["version"], 2, "config published version 1 at start");

    let worker_url = url.clone();
    common::scripted::spawn(worker_url, Script::Stall);
    wait_for_models(&url);
    let workers = cli(&url, &["list-workers"]);
    // What the worker's heartbeat said about its engine and GPU is shown.
    assert_eq!(workers["workers"][0]["engine"], "llama_cpp", "{workers}");
    // One process: the list is whole, and no worker is tagged with a node.
    assert_eq!(workers["complete"], true, "{workers}");
    assert!(workers["workers"][0].get("node").is_none(), "{workers}");
    assert_eq!(
        workers["workers"][0]["gpus"][0]["name"], "Scripted GPU 24GB",
        "{workers}"
    );
    assert_eq!(workers["workers"][0]["gpus"][0]["memory_total_mib"], 24_564);
    let worker = workers["workers"][0]["worker"]
        .as_str()
        .expect("worker")
        .to_owned();
    cli(&url, &["ban-worker", "--worker", &worker]);
    wait_for("the banned worker to be gone", || {
        cli(&url, &["list-workers"])["workers"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["banned"] == true))
    });
    std::thread::sleep(Duration::from_millis(200));
    let models: Value = ureq::get(&format!("{url}/v1/models"))
        .call()
        .expect("models")
        .into_json()
        .expect("json");
    assert_eq!(
        models["data"].as_array().expect("list").len(),
        0,
        "a banned worker serves nothing"
    );

    // Nothing but the admin token opens the admin API.
    let out = Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
        .args(["admin", "--url", &url, "list-accounts"])
        .env("TROOP_ADMIN_TOKEN", "wrong")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}
