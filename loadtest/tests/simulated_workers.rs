//! `troop-loadtest workers` and `engine` against a real coordinator: simulated
//! workers speak the real agent protocol, consumers stream through them, and
//! every request is billed and settled.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troop_coordinator::config::{Config, PriceConfig};

const ADMIN: &str = "loadtest-admin";
const WORKERS: u64 = 20;

fn admin(url: &str, path: &str, body: Value) -> Value {
    ureq::post(&format!("{url}{path}"))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .send_json(body)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_json()
        .expect("json")
}

fn online(url: &str) -> u64 {
    ureq::get(&format!("{url}/v1/models"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .and_then(|v| v["data"][0]["workers_online"].as_u64())
        .unwrap_or(0)
}

#[test]
fn consumers_stream_through_simulated_workers_and_pay_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    troop_coordinator::server::spawn(
        Config {
            data_dir: dir.path().to_path_buf(),
            admin_token: ADMIN.into(),
            heartbeat_interval_ms: 1_000,
            heartbeat_epoch_ms: 1_000,
            prices: vec![PriceConfig {
                model: "mock".into(),
                input_micro_per_1k: 1_000,
                output_micro_per_1k: 2_000,
            }],
            ..Config::default()
        },
        listener,
    )
    .expect("coordinator");

    let workers = Command::new(env!("CARGO_BIN_EXE_troop-loadtest"))
        .args(["workers", "--coordinator", &url, "--token-interval-ms", "1"])
        .args([
            "--count",
            &WORKERS.to_string(),
            "--slots",
            "2",
            // Long enough for the consumers below on a slow machine.
            "--hold-s",
            "10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("workers start");
    let started = Instant::now();
    while online(&url) < WORKERS {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "workers never came online"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let account = admin(&url, "/admin/accounts", json!({}))["account"]
        .as_str()
        .expect("account")
        .to_owned();
    admin(
        &url,
        "/admin/grants",
        json!({"account": account, "amount_micro": 10_000_000}),
    );
    let key = admin(&url, "/admin/keys", json!({"account": account}))["secret"]
        .as_str()
        .expect("key")
        .to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_troop-loadtest"))
        .args(["gateway", "--url", &url, "--key", &key, "--model", "mock"])
        .args([
            "--concurrency",
            "8",
            "--requests",
            "32",
            "--max-tokens",
            "16",
        ])
        .output()
        .expect("gateway runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(
        (v["ok"].as_u64(), v["failed"].as_u64()),
        (Some(32), Some(0)),
        "{v}"
    );
    assert!(v["tokens_per_s"].as_f64().expect("rate") > 0.0, "{v}");

    let acct: Value = ureq::get(&format!("{url}/v1/account"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .expect("account")
        .into_json()
        .expect("json");
    assert_eq!(acct["holds"].as_array().map(Vec::len), Some(0), "{acct}");
    let balance: u64 = acct["balance_micro"]
        .as_str()
        .and_then(|b| b.parse().ok())
        .expect("balance");
    // 32 answers of 16 tokens at 2 micro-credits a token, plus prompts.
    assert!(balance <= 10_000_000 - 32 * 16 * 2, "charged: {acct}");

    // The event log has each worker's jobs and, with one-second epochs, its
    // heartbeat summaries (an epoch is logged when the next one starts).
    let list = || -> Vec<Value> {
        let v: Value = ureq::get(&format!("{url}/admin/workers"))
            .set("authorization", &format!("Bearer {ADMIN}"))
            .call()
            .expect("list workers")
            .into_json()
            .expect("json");
        v["workers"].as_array().expect("workers").clone()
    };
    let summarized = |w: &Value| w["history"]["epochs"].as_u64().unwrap_or(0) >= 1;
    let waited = Instant::now();
    let mut listed = list();
    while !listed.iter().all(summarized) && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        listed = list();
    }
    assert_eq!(listed.len() as u64, WORKERS);
    assert!(
        listed.iter().all(summarized),
        "every worker has a heartbeat summary: {listed:?}"
    );
    let started: u64 = listed
        .iter()
        .map(|w| w["history"]["jobs_started"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(started, 32, "one job_started per request");

    let out = workers.wait_with_output().expect("workers finish");
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(report["workers"], WORKERS);
    assert_eq!(report["online_at_end"], WORKERS, "{report}");
}
