//! `troop-loadtest gateway` against a real llama.cpp server.

#[path = "../../worker-agent/tests/common/model_server.rs"]
mod model_server;

#[test]
fn gateway_reports_percentiles_from_a_real_engine() {
    let server = model_server::ModelServer::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_troop-loadtest"))
        .args([
            "gateway",
            "--url",
            &server.url(),
            "--model",
            "smollm2-135m",
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--max-tokens",
            "8",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(
        (v["ok"].as_u64(), v["failed"].as_u64()),
        (Some(4), Some(0)),
        "{v}"
    );
    let (p50, p99) = (
        v["ttft_ms"]["p50"].as_f64().expect("p50"),
        v["ttft_ms"]["p99"].as_f64().expect("p99"),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{v}");
    assert!(v["tokens_per_s"].as_f64().expect("rate") > 0.0);
}
