//! Engine detection against a real llama.cpp server with a real model
//! (SmolLM2-135M, started by ops/model-server.sh).

use std::process::Command;

#[path = "common/model_server.rs"]
mod model_server;
use model_server::ModelServer;

use troop_agent::engine;
use troop_schemas::protocol::EngineKind;

#[tokio::test]
async fn finds_and_describes_a_real_llama_cpp_server() {
    let server = ModelServer::start();
    let client = engine::client();
    // A dead port first, as when vLLM is not running: detection moves on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let candidates = vec![
        (EngineKind::Vllm, format!("http://127.0.0.1:{dead}")),
        (EngineKind::LlamaCpp, server.url()),
    ];
    let found = engine::detect(&client, &candidates)
        .await
        .expect("detects the live engine");
    assert_eq!(
        found.kind,
        EngineKind::LlamaCpp,
        "identified from the answer, not just the port"
    );
    assert_eq!(found.base_url, server.url());
    assert_eq!(found.slots, 2, "slots read from /props");
    let model = found
        .models
        .iter()
        .find(|m| m.name == "smollm2-135m")
        .expect("the served model is listed");
    assert_eq!(
        model.context_length,
        Some(4096),
        "8192 context split over 2 slots"
    );

    let nothing = vec![(EngineKind::Vllm, format!("http://127.0.0.1:{dead}"))];
    assert!(matches!(
        engine::detect(&client, &nothing).await,
        Err(engine::EngineError::NoneFound(_))
    ));
}

#[test]
fn status_cli_reports_the_engine_and_cpu_mode() {
    let server = ModelServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("worker.key");
    let out = Command::new(env!("CARGO_BIN_EXE_troop-agent"))
        .args(["status", "--json", "--engine", &server.url(), "--key"])
        .arg(&key)
        .env("PATH", "/usr/bin:/bin") // no nvidia-smi on the test machine's PATH
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["engine"], "llama_cpp");
    assert_eq!(v["models"][0]["name"], "smollm2-135m");
    assert!(v["worker"].as_str().expect("id").starts_with("wrk_"));
    assert!(key.exists(), "identity created on first run");
    let again = Command::new(env!("CARGO_BIN_EXE_troop-agent"))
        .args(["keygen", "--key"])
        .arg(&key)
        .output()
        .expect("runs");
    assert!(
        !again.status.success(),
        "keygen never overwrites an identity"
    );
}
