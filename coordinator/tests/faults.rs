//! Workers that lie or fail, against the real coordinator. The worker here is a
//! scripted peer speaking the real protocol (a test double for our own logic;
//! the real engine path is e2e_llamacpp.rs). In every case no credit is lost:
//! the consumer pays at most for what it was streamed, and no hold stays open.

mod common;

use std::time::{Duration, Instant};

use common::scripted::{MODEL, Script, scripted_worker};
use serde_json::{Value, json};
use troop_coordinator::config::{Config, PriceConfig};

const ADMIN: &str = "faults-admin";
const GRANT: u64 = 1_000_000;

fn start_coordinator(dir: &std::path::Path) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let config = Config {
        data_dir: dir.to_path_buf(),
        admin_token: ADMIN.into(),
        heartbeat_interval_ms: 1_000,
        first_byte_deadline_ms: 5_000,
        prices: vec![PriceConfig {
            model: MODEL.into(),
            input_micro_per_1k: 1_000,
            output_micro_per_1k: 10_000,
        }],
        ..Config::default()
    };
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let state = troop_coordinator::server::open_state(config).expect("opens");
            troop_coordinator::server::serve(state, listener)
                .expect("serves")
                .await
                .expect("runs");
        });
    });
    let start = Instant::now();
    while ureq::get(&format!("{url}/v1/models")).call().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "coordinator did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    url
}

fn admin(url: &str, path: &str, body: Value) -> Value {
    ureq::post(&format!("{url}{path}"))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .send_json(body)
        .expect(path)
        .into_json()
        .expect("json")
}

/// Runs one scripted job; returns (streamed text, balance after, open holds after).
fn run(script: Script) -> (String, u64, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_coordinator(dir.path());
    let account = admin(&url, "/admin/accounts", json!({}))["account"]
        .as_str()
        .expect("account")
        .to_owned();
    admin(
        &url,
        "/admin/grants",
        json!({"account": account, "amount_micro": GRANT}),
    );
    let key = admin(&url, "/admin/keys", json!({"account": account}))["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let worker_url = url.clone();
    let worker = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .expect("rt")
            .block_on(scripted_worker(worker_url, script))
    });
    let start = Instant::now();
    while ureq::get(&format!("{url}/v1/models"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .is_none_or(|v| v["data"].as_array().is_none_or(Vec::is_empty))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker did not come online"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": true});
    let text = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(body)
        .expect("the stream starts")
        .into_string()
        .unwrap_or_default();
    worker.join().expect("worker");
    // Settlement may finish just after the stream (disconnect paths); wait for it.
    let start = Instant::now();
    loop {
        let acct: Value = ureq::get(&format!("{url}/v1/account"))
            .set("authorization", &format!("Bearer {key}"))
            .call()
            .expect("account")
            .into_json()
            .expect("json");
        let holds = acct["holds"].as_array().expect("holds").len();
        let balance = acct["balance_micro"]
            .as_str()
            .expect("balance")
            .parse()
            .expect("number");
        if holds == 0 || start.elapsed() > Duration::from_secs(20) {
            return (text, balance, holds);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_inflating_worker_is_paid_for_what_it_streamed() {
    let (text, balance, holds) = run(Script::Inflate);
    assert!(text.contains("Hello") && text.contains("friend"), "{text}");
    assert_eq!(holds, 0);
    // 3 streamed tokens at 10,000 µc/1k (⌈30⌉) + at most 10 prompt tokens at 1,000/1k (⌈10⌉) — not 1,000 tokens.
    let paid = GRANT - balance;
    assert!(paid > 0 && paid <= 40, "paid {paid}");
}

#[test]
fn a_forged_receipt_earns_nothing_and_costs_the_consumer_nothing() {
    let (text, balance, holds) = run(Script::Forge);
    assert!(text.contains("Hello"), "{text}");
    assert_eq!((balance, holds), (GRANT, 0));
}

#[test]
fn a_worker_vanishing_mid_stream_leaves_no_hold_and_no_charge() {
    let (_, balance, holds) = run(Script::Vanish);
    assert_eq!((balance, holds), (GRANT, 0));
}
