//! Workers that lie or fail, against the real coordinator. The worker here is a
//! scripted peer speaking the real protocol (a test double for our own logic;
//! the real engine path is e2e_llamacpp.rs). In every case no credit is lost:
//! the consumer pays at most for what it was streamed, and no hold stays open.

use std::time::{Duration, Instant};

use ed25519_dalek::{Signer as _, SigningKey};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use troop_coordinator::config::{Config, PriceConfig};
use troop_schemas::protocol::{
    self, CoordinatorMsg, DataFrame, EngineKind, Heartbeat, ModelInfo, WorkerMsg,
};
use troop_schemas::{Digest, PublicKey, Receipt, Signature, WorkerId};

const ADMIN: &str = "faults-admin";
const MODEL: &str = "scripted";
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

#[derive(Clone, Copy, Debug)]
enum Script {
    /// Streams 3 tokens, then claims 1,000 in a validly signed receipt.
    Inflate,
    /// Streams 3 tokens, then sends a receipt with a forged signature.
    Forge,
    /// Streams 2 tokens, then drops the connection without a receipt.
    Vanish,
}

const STREAM: [&str; 3] = ["Hello", " there", " friend"];

fn sse(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for t in &STREAM[..n] {
        out.push_str(&format!("data: {}\n\n", json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})));
    }
    out.push_str(&format!("data: {}\n\n", json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})));
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

/// Serves exactly one job according to `script`.
async fn scripted_worker(url: String, script: Script) {
    let key = SigningKey::from_bytes(&[42; 32]);
    let pk = PublicKey(key.verifying_key().to_bytes());
    let ws_url = format!("{}/worker", url.replace("http://", "ws://"));
    let (ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("connects");
    let (mut tx, mut rx) = ws.split();
    let mut next = async || loop {
        match rx.next().await.expect("open").expect("frame") {
            Message::Text(t) => return CoordinatorMsg::parse(&t).expect("valid"),
            _ => continue,
        }
    };
    tx.send(Message::text(
        WorkerMsg::Hello {
            protocol: protocol::PROTOCOL_VERSION,
            key: pk,
            agent_version: "scripted".into(),
        }
        .to_text(),
    ))
    .await
    .expect("send");
    let CoordinatorMsg::Challenge {
        nonce,
        coordinator_key,
    } = next().await
    else {
        panic!("challenge")
    };
    use base64::Engine as _;
    let nonce: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(nonce)
        .expect("b64")
        .try_into()
        .expect("32");
    let sig = key.sign(&protocol::auth_message(&nonce, &coordinator_key, &pk));
    tx.send(Message::text(
        WorkerMsg::Auth {
            signature: Signature(sig.to_bytes()),
        }
        .to_text(),
    ))
    .await
    .expect("send");
    let CoordinatorMsg::Welcome { .. } = next().await else {
        panic!("welcome")
    };
    let beat = Heartbeat {
        engine: EngineKind::LlamaCpp,
        models: vec![ModelInfo {
            name: MODEL.into(),
            context_length: Some(4096),
        }],
        gpus: vec![],
        free_slots: 1,
        total_slots: 1,
        draining: false,
    };
    tx.send(Message::text(WorkerMsg::Heartbeat(beat).to_text()))
        .await
        .expect("send");
    let CoordinatorMsg::Job {
        job,
        hold,
        consumer,
        model,
        body,
        ..
    } = next().await
    else {
        panic!("job")
    };
    let n = if matches!(script, Script::Vanish) {
        2
    } else {
        3
    };
    let bytes = sse(n);
    if matches!(script, Script::Vanish) {
        // Half the stream, then gone.
        tx.send(Message::binary(
            DataFrame::encode(&job, &bytes[..bytes.len() / 2]).expect("frame"),
        ))
        .await
        .expect("send");
        tokio::time::sleep(Duration::from_millis(200)).await;
        return;
    }
    tx.send(Message::binary(
        DataFrame::encode(&job, &bytes).expect("frame"),
    ))
    .await
    .expect("send");
    let receipt = Receipt {
        consumer,
        finished_at_ms: 2,
        hold,
        input_tokens: 10,
        job,
        model,
        output_tokens: 1_000,
        request_digest: Digest::of(body.as_bytes()),
        response_digest: Digest::of(&bytes),
        started_at_ms: 1,
        worker: WorkerId::from_key(&pk),
        worker_key: pk,
    };
    let mut worker_sig = Signature(
        key.sign(&receipt.signing_bytes().expect("bytes"))
            .to_bytes(),
    );
    if matches!(script, Script::Forge) {
        worker_sig.0[0] ^= 1;
    }
    let done = WorkerMsg::JobDone {
        job,
        usage: None,
        receipt: Box::new(receipt),
        worker_sig,
    };
    tx.send(Message::text(done.to_text())).await.expect("send");
    // Stay connected until the coordinator has settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
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
