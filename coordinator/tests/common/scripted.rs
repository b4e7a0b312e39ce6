//! A scripted worker speaking the real protocol: a test double for our own
//! logic (the real engine path is e2e_llamacpp.rs).
#![allow(dead_code, reason = "each test binary uses different scripts")]

use std::time::Duration;

use ed25519_dalek::{Signer as _, SigningKey};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use troop_schemas::protocol::{
    self, CoordinatorMsg, DataFrame, EngineKind, GpuInfo, Heartbeat, ModelInfo, WorkerMsg,
};
use troop_schemas::{AccountId, Digest, HoldId, JobId, PublicKey, Receipt, Signature, WorkerId};

pub const MODEL: &str = "scripted";

#[derive(Clone, Copy, Debug)]
pub enum Script {
    /// Streams 3 tokens, then claims 1,000 in a validly signed receipt.
    Inflate,
    /// Streams 3 tokens, then sends a receipt with a forged signature.
    Forge,
    /// Streams 2 tokens, then drops the connection without a receipt.
    Vanish,
    /// Takes every job it is given, sends its first token, and never finishes.
    Stall,
    /// Streams one token, then bytes that are not an event stream (invalid
    /// UTF-8 in a data line), then a signed receipt claiming 1,000 tokens.
    Garbage,
    /// Sends a data frame over the protocol's size limit as its first output.
    Oversized,
    /// Floods its first job with 36 MB of output, then serves the next job
    /// like `Inflate` does.
    Flood,
    /// Answers with a tool call in three pieces (and checks the request's
    /// `tools` reached it unchanged).
    ToolCall,
    /// Streams a token every 50 ms until the coordinator cancels the job
    /// (panics if it never does), then sends a signed receipt for what it
    /// streamed, as the real agent does (claiming 1,000 tokens).
    UntilCancelled,
}

/// Tokens [`Script::UntilCancelled`] streams at most.
pub const UNTIL_CANCELLED_MAX: usize = 200;

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
pub async fn scripted_worker(url: String, script: Script) {
    scripted_worker_as(url, script, 42).await;
}

/// [`scripted_worker`] as the worker whose key is `[seed; 32]` (another
/// identity than the usual scripted worker's).
pub async fn scripted_worker_as(url: String, script: Script, seed: u8) {
    let key = SigningKey::from_bytes(&[seed; 32]);
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
        gpus: vec![GpuInfo {
            name: "Scripted GPU 24GB".into(),
            memory_total_mib: 24_564,
            memory_used_mib: 1_210,
            utilization_pct: 37,
            temperature_c: 45,
        }],
        free_slots: 8,
        total_slots: 8,
        draining: false,
    };
    tx.send(Message::text(WorkerMsg::Heartbeat(beat.clone()).to_text()))
        .await
        .expect("send");
    if matches!(script, Script::Stall) {
        let one = sse(1);
        let first = &one[..one.len() / 3];
        loop {
            match tokio::time::timeout(Duration::from_millis(500), rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let CoordinatorMsg::Job { job, .. } =
                        CoordinatorMsg::parse(&t).expect("valid")
                    {
                        let frame = DataFrame::encode(&job, first).expect("frame");
                        if tx.send(Message::binary(frame)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Some(Ok(_))) => {}
                // Its coordinator is gone (the fault tests kill it): done.
                Ok(None | Some(Err(_))) => return,
                Err(_) => {
                    // Keep the heartbeat going so the coordinator keeps placing jobs here.
                    let beat = Message::text(WorkerMsg::Heartbeat(beat.clone()).to_text());
                    if tx.send(beat).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    if matches!(script, Script::Flood) {
        let CoordinatorMsg::Job { job, .. } = next().await else {
            panic!("job")
        };
        let content = "x".repeat(60_000);
        let event = format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
        );
        let frame = DataFrame::encode(&job, event.as_bytes()).expect("frame");
        for _ in 0..600 {
            if tx.send(Message::binary(frame.clone())).await.is_err() {
                return;
            }
        }
    }
    let (job, hold, consumer, model, body) = loop {
        // Heartbeats while it waits: a coordinator drops a worker silent for
        // three intervals (a second apiece on the cluster tests' nodes), and
        // a slow machine may take that long to send the job.
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), next()).await else {
            let beat = Message::text(WorkerMsg::Heartbeat(beat.clone()).to_text());
            tx.send(beat).await.expect("send");
            continue;
        };
        match msg {
            CoordinatorMsg::Job {
                job,
                hold,
                consumer,
                model,
                body,
                ..
            } => break (job, hold, consumer, model, body),
            CoordinatorMsg::Cancel { .. } => continue,
            other => panic!("expected a job, got {other:?}"),
        }
    };
    if matches!(script, Script::UntilCancelled) {
        let mut sent = Vec::new();
        let mut cancelled = false;
        for i in 0..UNTIL_CANCELLED_MAX {
            let piece = format!(
                "data: {}\n\n",
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": format!(" t{i}")}, "finish_reason": null}]})
            );
            tx.send(Message::binary(
                DataFrame::encode(&job, piece.as_bytes()).expect("frame"),
            ))
            .await
            .expect("send");
            sent.extend_from_slice(piece.as_bytes());
            if let Ok(CoordinatorMsg::Cancel { job: c }) =
                tokio::time::timeout(Duration::from_millis(50), next()).await
            {
                assert_eq!(c, job, "the cancel names the job");
                cancelled = true;
                break;
            }
        }
        assert!(cancelled, "the coordinator never cancelled the job");
        let done = job_done(&key, (job, hold, consumer, model), &body, &sent, false);
        tx.send(Message::text(done.to_text())).await.expect("send");
        tokio::time::sleep(Duration::from_secs(2)).await;
        return;
    }
    let n = if matches!(script, Script::Vanish) {
        2
    } else {
        3
    };
    let mut bytes = sse(n);
    if matches!(script, Script::Oversized) {
        let mut frame = job.0.to_vec();
        frame.resize(16 + protocol::MAX_DATA_FRAME_BYTES + 1, b'x');
        // The coordinator cuts the connection; sending may or may not complete.
        let _ = tx.send(Message::binary(frame)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    }
    if matches!(script, Script::ToolCall) {
        let sent: serde_json::Value = serde_json::from_str(&body).expect("json body");
        assert_eq!(
            sent["tools"][0]["function"]["name"], "get_weather",
            "tools pass through"
        );
        let piece = |delta: serde_json::Value, finish: serde_json::Value| {
            format!(
                "data: {}\n\n",
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        bytes = [
            piece(json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}), json!(null)),
            piece(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}), json!(null)),
            piece(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), json!(null)),
            piece(json!({}), json!("tool_calls")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat()
        .into_bytes();
    }
    if matches!(script, Script::Garbage) {
        bytes = sse(1);
        bytes.truncate(bytes.iter().position(|&b| b == b'\n').expect("one line") + 2);
        bytes.extend_from_slice(b"data: {\"choices\": \"\xff\xfe\"}\n\n");
    }
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
    let forge = matches!(script, Script::Forge);
    let done = job_done(&key, (job, hold, consumer, model), &body, &bytes, forge);
    tx.send(Message::text(done.to_text())).await.expect("send");
    // Stay connected until the coordinator has settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// The job's end with a receipt signed by `key` for `response`, claiming
/// 1,000 output tokens (a lie the coordinator must not bill); `forge` breaks
/// the signature.
fn job_done(
    key: &SigningKey,
    (job, hold, consumer, model): (JobId, HoldId, AccountId, String),
    body: &str,
    response: &[u8],
    forge: bool,
) -> WorkerMsg {
    let pk = PublicKey(key.verifying_key().to_bytes());
    let receipt = Receipt {
        consumer,
        finished_at_ms: 2,
        hold,
        input_tokens: 10,
        job,
        model,
        output_tokens: 1_000,
        request_digest: Digest::of(body.as_bytes()),
        response_digest: Digest::of(response),
        started_at_ms: 1,
        worker: WorkerId::from_key(&pk),
        worker_key: pk,
    };
    let mut worker_sig = Signature(
        key.sign(&receipt.signing_bytes().expect("bytes"))
            .to_bytes(),
    );
    if forge {
        worker_sig.0[0] ^= 1;
    }
    WorkerMsg::JobDone {
        job,
        usage: None,
        receipt: Box::new(receipt),
        worker_sig,
    }
}

/// Runs [`scripted_worker`] on its own thread and runtime.
pub fn spawn(url: String, script: Script) -> std::thread::JoinHandle<()> {
    spawn_as(url, script, 42)
}

/// Runs [`scripted_worker_as`] on its own thread and runtime.
pub fn spawn_as(url: String, script: Script, seed: u8) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .expect("rt")
            .block_on(scripted_worker_as(url, script, seed))
    })
}

/// Starts `n` streamed chat completions on `url`, each on its own thread,
/// left to run until their coordinator answers or dies (a [`Script::Stall`]
/// worker never finishes them).
pub fn streams_in_flight(url: &str, key: &str, n: usize) {
    for _ in 0..n {
        let (url, key) = (url.to_owned(), key.to_owned());
        std::thread::spawn(move || {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": true});
            let _ = ureq::post(&format!("{url}/v1/chat/completions"))
                .set("authorization", &format!("Bearer {key}"))
                .send_json(body)
                .map(|r| r.into_string());
        });
    }
}

/// Reads a [`Script::UntilCancelled`] stream until it has `tokens` tokens,
/// then hangs up; returns the receipt id the response named.
pub fn hang_up_after(response: ureq::Response, tokens: usize) -> String {
    use std::io::BufRead as _;
    let receipt = response
        .header("troop-receipt")
        .expect("names its receipt")
        .to_owned();
    let mut lines = std::io::BufReader::new(response.into_reader()).lines();
    let mut seen = 0;
    while seen < tokens {
        let line = lines.next().expect("more lines").expect("readable");
        if line.contains(" t") {
            seen += 1;
        }
    }
    receipt
}
