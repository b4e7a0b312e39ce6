//! The main job, end to end on the embedded default: the official OpenAI
//! Python SDK → coordinator → troop-agent → a real llama.cpp server with a
//! real model; then the books, checked from the outside with troop-audit.

mod common;
#[path = "../../worker-agent/tests/common/model_server.rs"]
mod model_server;

use std::process::Command;

use common::harness::{account, consumer, start_in_process, wait_for};
use model_server::{ModelServer, repo_root, venv};
use serde_json::Value;
use troop_coordinator::config::{Config, PriceConfig};
use troop_ledger::note::NoteVerifier;
use troop_ledger::proof::TlogProof;
use troop_ledger::tile::{self, TileHashReader, TileId, TileSource as _};
use troop_schemas::{Event, decode_entry};

const ADMIN: &str = "e2e-admin-token";
const MODEL: &str = "smollm2-135m";
const GRANT_MICRO: u64 = 5_000_000;

fn start_coordinator(data_dir: std::path::PathBuf) -> String {
    start_in_process(Config {
        data_dir,
        admin_token: ADMIN.into(),
        heartbeat_interval_ms: 1_000,
        prices: vec![PriceConfig {
            model: MODEL.into(),
            input_micro_per_1k: 1_000,
            output_micro_per_1k: 3_000,
        }],
        ..Config::default()
    })
}

fn start_agent(coordinator: String, engine_url: String, key: std::path::PathBuf) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let engine = troop_agent::engine::probe(&troop_agent::engine::client(), &engine_url)
                .await
                .expect("engine");
            let (identity, _) = troop_agent::identity::load_or_create(&key).expect("identity");
            let agent = troop_agent::link::Agent::new(vec![coordinator], engine, identity, 2);
            let (_stop, stop_rx) = tokio::sync::watch::channel(false);
            troop_agent::link::run(agent, stop_rx).await;
        });
    });
}

#[test]
fn openai_sdk_through_coordinator_and_agent_to_llama_cpp_paid_and_audited() {
    let model = ModelServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_coordinator(dir.path().join("data"));
    start_agent(url.clone(), model.url(), dir.path().join("worker.key"));
    wait_for("the worker's model", || {
        ureq::get(&format!("{url}/v1/models"))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v["data"][0]["id"] == MODEL)
    });

    let (_, key) = consumer(&url, ADMIN, GRANT_MICRO);

    // Bad input gets OpenAI-shaped errors before anything is held.
    let unauthorized = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", "Bearer troop-sk-00-00")
        .send_string("{}");
    assert!(matches!(unauthorized, Err(ureq::Error::Status(401, _))));
    let broke = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_string("{not json");
    match broke {
        Err(ureq::Error::Status(400, r)) => assert_eq!(
            r.into_json::<Value>().expect("json")["error"]["type"],
            "invalid_request_error"
        ),
        other => panic!("expected 400, got {other:?}"),
    }

    let out = Command::new(venv().join("bin/python"))
        .arg(repo_root().join("coordinator/tests/py/openai_chat.py"))
        .args([&url, &key, MODEL])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "openai SDK run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Value = serde_json::from_slice(&out.stdout).expect("json line");
    assert!(
        !sdk["content"].as_str().expect("content").trim().is_empty(),
        "{sdk}"
    );
    assert!(
        !sdk["whole_content"]
            .as_str()
            .expect("content")
            .trim()
            .is_empty(),
        "{sdk}"
    );
    assert_eq!(sdk["missing_model_error"], "NotFoundError");
    let usage = &sdk["usage"];
    let billed_out = usage["completion_tokens"].as_u64().expect("usage chunk");
    assert!(billed_out > 0 && billed_out <= 24, "{usage}");
    let receipt_id = sdk["receipt"]
        .as_str()
        .expect("the final chunk names the receipt")
        .to_owned();

    // The books, from the outside: the published ledger over HTTP, with troop-audit.
    let vkey = std::fs::read_to_string(dir.path().join("data/ledger.vkey")).expect("vkey");
    let verifier = NoteVerifier::from_key_string(&vkey).expect("vkey");
    let ledger_url = format!("{url}/ledger");
    let mut report = None;
    wait_for("a checkpoint covering both settlements", || {
        let source = troop_audit::Source::open(&ledger_url).expect("source");
        let r = troop_audit::verify(&source, &verifier, None, &|_| {})
            .expect("troop-audit accepts the live ledger");
        let done = r.receipts == 2;
        report = Some(r);
        done
    });
    let report = report.expect("report");
    assert_eq!(
        report.ledger.open_holds().count(),
        0,
        "every hold was settled"
    );

    // Find the streamed request's settlement and its index.
    let source = troop_audit::Source::open(&ledger_url).expect("source");
    let size = report.checkpoint.size;
    let mut found = None;
    for t in 0..size.div_ceil(256) {
        let id = TileId::for_size(None, t, size).expect("bundle");
        let bytes = source
            .read(&id.path())
            .expect("read")
            .expect("bundle exists");
        for (i, e) in tile::decode_bundle(&bytes, usize::from(id.width))
            .expect("bundle")
            .into_iter()
            .enumerate()
        {
            if let Event::HoldSettled {
                receipt,
                charged_micro,
                ..
            } = decode_entry(e).expect("entry")
                && receipt.receipt.job.to_string() == receipt_id
            {
                found = Some((t * 256 + i as u64, e.to_vec(), receipt, charged_micro.get()));
            }
        }
    }
    let (index, entry, receipt, charged) =
        found.expect("the streamed job is settled in the ledger");
    assert_eq!(
        receipt.billed_output_tokens, billed_out,
        "the consumer's usage is what it was billed"
    );
    assert!(receipt.receipt.output_tokens >= receipt.billed_output_tokens);
    troop_ledger::receipt::verify_receipt(&receipt)
        .expect("worker signature and countersignature verify");

    // Balances moved by exactly the receipts.
    let acct = account(&url, &key);
    let charges: u64 = report
        .ledger
        .accounts()
        .filter(|(_, a)| a.role == Some(troop_schemas::AccountRole::Worker))
        .map(|(_, a)| u64::try_from(a.balance()).expect("worker earned"))
        .sum::<u64>();
    let treasury_fees = report
        .ledger
        .account(&troop_schemas::AccountId::TREASURY)
        .expect("treasury")
        .balance()
        + i128::from(GRANT_MICRO);
    let spent = GRANT_MICRO
        - acct["balance_micro"]
            .as_str()
            .expect("balance")
            .parse::<u64>()
            .expect("number");
    assert_eq!(
        i128::from(spent),
        i128::from(charges) + treasury_fees,
        "consumer paid = worker earned + fees"
    );
    assert!(spent >= charged && charged > 0);

    // The coordinator serves the receipt with its proof to the consumer who paid.
    let served: Value = ureq::get(&format!("{url}/v1/receipts/{receipt_id}"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .expect("receipt")
        .into_json()
        .expect("json");
    assert_eq!(served["ledger_index"], index);
    assert_eq!(
        served["entry"].as_str().expect("entry").as_bytes(),
        entry.as_slice()
    );
    let served_proof =
        TlogProof::parse(served["tlog_proof"].as_str().expect("proof")).expect("tlog-proof");
    served_proof
        .verify(&entry, &verifier)
        .expect("the served proof verifies");
    let other = ureq::get(&format!(
        "{url}/v1/receipts/job_00000000000000000000000000000000"
    ))
    .set("authorization", &format!("Bearer {key}"))
    .call();
    assert!(matches!(other, Err(ureq::Error::Status(404, _))));

    // An oversized body gets an OpenAI-shaped 413.
    let huge = vec![b' '; (8 << 20) + 1];
    match ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_bytes(&huge)
    {
        Err(ureq::Error::Status(413, r)) => assert_eq!(
            r.into_json::<Value>().expect("json")["error"]["code"],
            "request_too_large"
        ),
        other => panic!("expected 413, got {other:?}"),
    }

    // Operators see it in Prometheus.
    let metrics = ureq::get(&format!("{url}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    assert!(
        metrics.contains("troop_receipts_settled_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("troop_workers_online 1"), "{metrics}");
    assert!(
        metrics.contains("troop_event_log_lag_records 0"),
        "every settlement is durable once answered: {metrics}"
    );
    assert!(
        metrics.contains("troop_requests_total{endpoint=\"chat\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("troop_time_to_first_token_seconds_count 2"),
        "{metrics}"
    );

    // The receipt's inclusion proof verifies offline.
    let (note, cp) = troop_audit::read_checkpoint(&source, &verifier).expect("checkpoint");
    let proof =
        TlogProof::build(&TileHashReader::new(&source, cp.size), &note, &cp, index).expect("proof");
    let reparsed = TlogProof::parse(&proof.to_text()).expect("tlog-proof text");
    reparsed
        .verify(&entry, &verifier)
        .expect("inclusion proof verifies");
}
