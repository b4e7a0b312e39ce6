//! Cluster nodes (`troop-coordinator node`) started in-process for tests,
//! each in a thread with its own actix system, sharing the network's keys.
#![allow(dead_code, reason = "each test binary uses a different part")]

use serde_json::Value;
use troop_coordinator::cluster::node::{self, NodeIdentity};
use troop_coordinator::config::{ClusterConfig, Config, PriceConfig};

use super::scripted::MODEL;

pub const ADMIN: &str = "cluster-node-admin";
pub const SECRET: &str = "a cluster secret for the node tests";

/// `n` data directories holding the same copy of the network's keys.
pub fn shared_keys(n: usize) -> Vec<tempfile::TempDir> {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().expect("dir")).collect();
    for file in ["ledger.key", "coordinator.key", "apikey-hash.key"] {
        let seed = hex::encode(
            rand_core::RngCore::next_u64(&mut rand_core::OsRng)
                .to_le_bytes()
                .repeat(4),
        );
        for d in &dirs {
            std::fs::write(d.path().join(file), &seed).expect("key file");
        }
    }
    dirs
}

/// Starts a node on `dir` in a thread of its own; returns its URL once it
/// answers.
pub fn start_node(name: &str, dir: &std::path::Path, cluster: &ClusterConfig) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let config = Config {
        data_dir: dir.to_path_buf(),
        admin_token: ADMIN.into(),
        heartbeat_interval_ms: 1_000,
        prices: vec![PriceConfig {
            model: MODEL.into(),
            input_micro_per_1k: 1_000,
            output_micro_per_1k: 10_000,
        }],
        cluster: ClusterConfig {
            secret: SECRET.into(),
            ..cluster.clone()
        },
        ..Config::default()
    };
    let me = NodeIdentity {
        name: name.into(),
        internal_url: url.clone(),
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            actix_web::rt::System::new()
                .block_on(node::serve(config, me, listener))
                .expect("the node serves");
        })
        .expect("thread");
    super::harness::wait_until_ready(&url);
    url
}

/// `path` read with the bearer `key`: the JSON, or the status of a refusal.
pub fn get(url: &str, key: &str, path: &str) -> Result<Value, u16> {
    match ureq::get(&format!("{url}{path}"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
    {
        Ok(r) => Ok(r.into_json().expect("json")),
        Err(ureq::Error::Status(code, _)) => Err(code),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// A chat completion through `url` served by a `Script::Inflate` worker:
/// checks its text and that the node billed the three tokens it streamed,
/// not the thousand claimed; returns the receipt's id.
pub fn inflated_chat(url: &str, key: &str, what: &str) -> String {
    let response = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}))
        .expect(what);
    let job = response
        .header("troop-receipt")
        .expect("receipt header")
        .to_owned();
    let body: Value = response.into_json().expect("json");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello there friend"
    );
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    job
}
