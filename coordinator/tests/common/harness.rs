//! Starting a coordinator in-process and driving its HTTP API from tests.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troop_coordinator::config::Config;

/// Serves `config` on a free loopback port from its own actix system; returns
/// the base URL once it answers.
pub fn start_in_process(config: Config) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let state = troop_coordinator::server::open_state(config).expect("coordinator opens");
            troop_coordinator::server::serve(state, listener)
                .expect("serves")
                .await
                .expect("runs");
        });
    });
    wait_for("the coordinator", || {
        ureq::get(&format!("{url}/v1/models")).call().is_ok()
    });
    url
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Until a worker has announced a model.
pub fn wait_for_models(url: &str) {
    wait_for("a worker's models", || {
        ureq::get(&format!("{url}/v1/models"))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v["data"].as_array().is_some_and(|d| !d.is_empty()))
    });
}

pub fn admin(url: &str, token: &str, path: &str, body: Value) -> Value {
    ureq::post(&format!("{url}{path}"))
        .set("authorization", &format!("Bearer {token}"))
        .send_json(body)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_json()
        .expect("json")
}

/// Opens an account, grants it `grant_micro` and issues a key: (account, key).
pub fn consumer(url: &str, admin_token: &str, grant_micro: u64) -> (String, String) {
    let account = admin(url, admin_token, "/admin/accounts", json!({}))["account"]
        .as_str()
        .expect("account")
        .to_owned();
    admin(
        url,
        admin_token,
        "/admin/grants",
        json!({"account": account, "amount_micro": grant_micro}),
    );
    let key = admin(url, admin_token, "/admin/keys", json!({"account": account}))["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    (account, key)
}

pub fn account(url: &str, key: &str) -> Value {
    ureq::get(&format!("{url}/v1/account"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .expect("account")
        .into_json()
        .expect("json")
}
