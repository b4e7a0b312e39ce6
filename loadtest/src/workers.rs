//! `troop-loadtest workers`: N simulated workers on one coordinator. Each is
//! the real agent code (`troop_agent::link`): its own Ed25519 key, the real
//! handshake, heartbeats and job protocol, forwarding jobs to a mock engine
//! that streams synthetic tokens at a set rate (started in this process unless
//! `--engine` names one). Scale tests without GPUs.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use tokio::sync::watch;
use troop_agent::engine::Engine;
use troop_agent::identity::Identity;
use troop_agent::link::{self, Agent, GpuSource};
use troop_schemas::protocol::{EngineKind, ModelInfo};

use crate::engine::{self as mock, EngineArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct WorkersArgs {
    /// The coordinator's base URL.
    #[arg(long)]
    pub coordinator: String,
    /// Simulated workers.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Engine the workers forward jobs to; default: a mock engine in this process.
    #[arg(long)]
    pub engine: Option<String>,
    #[arg(long, default_value = "mock")]
    pub model: String,
    /// Time between synthetic tokens of the in-process mock engine.
    #[arg(long, default_value_t = 5)]
    pub token_interval_ms: u64,
    /// Concurrent jobs per worker.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// New connections per second (all at once is a different test).
    #[arg(long, default_value_t = 1000)]
    pub connect_per_s: u64,
    /// Once all are online, stay connected this long, then leave.
    #[arg(long, default_value_t = 30)]
    pub hold_s: u64,
    /// Give up if not all are online after this long.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// Workers the coordinator lists as online for `model`.
async fn online(http: &reqwest::Client, base: &str, model: &str) -> Result<u64> {
    let v: serde_json::Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == model)
        .and_then(|m| m["workers_online"].as_u64())
        .unwrap_or(0))
}

pub fn run(args: WorkersArgs) -> Result<serde_json::Value> {
    ensure!(
        args.count > 0 && args.connect_per_s > 0,
        "need at least one worker and a connect rate"
    );
    // Both cores for the agents; the actix system hosts the mock engine.
    actix_web::rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
    .block_on(simulate(args))
}

async fn simulate(args: WorkersArgs) -> Result<serde_json::Value> {
    let base = args.coordinator.trim_end_matches('/').to_owned();
    let (engine_url, _mock) = match &args.engine {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let (addr, handle) = mock::start(&EngineArgs {
                listen: "127.0.0.1:0".into(),
                model: args.model.clone(),
                token_interval_ms: args.token_interval_ms,
                default_tokens: 64,
                threads: 1,
            })?;
            (format!("http://{addr}"), Some(handle))
        }
    };
    let http = link::engine_client();
    let engine = Engine {
        kind: EngineKind::OpenAiCompatible,
        base_url: engine_url,
        models: vec![ModelInfo {
            name: args.model.clone(),
            context_length: Some(4096),
        }],
        slots: args.slots,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let gap =
        Duration::from_secs(1) / u32::try_from(args.connect_per_s.min(1_000_000)).unwrap_or(1);
    let mut agents = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let agent = Agent::with(
            vec![base.clone()],
            engine.clone(),
            Identity::ephemeral(),
            args.slots,
            GpuSource::Fixed(Vec::new()),
            http.clone(),
        );
        agents.push(tokio::spawn(link::run(agent, stop_rx.clone())));
        tokio::time::sleep(gap).await;
    }
    let spawned_s = started.elapsed().as_secs_f64();
    let probe = reqwest::Client::new();
    let deadline = started + Duration::from_secs(args.timeout_s);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = online(&probe, &base, &args.model).await.unwrap_or(seen);
        if seen >= args.count as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let online_s = started.elapsed().as_secs_f64();
    ensure!(
        seen >= args.count as u64,
        "only {seen} of {} workers online after {} s",
        args.count,
        args.timeout_s
    );
    tokio::time::sleep(Duration::from_secs(args.hold_s)).await;
    let still = online(&probe, &base, &args.model)
        .await
        .context("asking the coordinator for its workers")?;
    let _ = stop_tx.send(true);
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    Ok(json!({
        "workers": args.count,
        "spawned_s": spawned_s,
        "all_online_s": online_s,
        "held_s": args.hold_s,
        "online_at_end": still,
    }))
}
