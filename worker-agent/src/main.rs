//! `troop-agent`: parse arguments, call into the library.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use troop_agent::{engine, gpu, identity};

#[derive(Parser)]
#[command(
    name = "troop-agent",
    version,
    about = "Serve your GPU to the Troop network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the local engine and serve jobs from the coordinator until SIGTERM.
    Run {
        /// The coordinator's base URL (http:// or https://); for a cluster,
        /// several nodes (repeated or comma-separated), tried in turn when
        /// the connection ends.
        #[arg(long, required = true, value_delimiter = ',')]
        coordinator: Vec<String>,
        /// The engine's base URL; default: try vLLM, Ollama, LM Studio, llama.cpp on localhost.
        #[arg(long)]
        engine: Option<String>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// Concurrent jobs; default: the engine's slots.
        #[arg(long)]
        slots: Option<u32>,
    },
    /// Create this worker's identity key (refuses to overwrite one).
    Keygen {
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Show identity, engine, models and GPUs, as the coordinator would see them.
    Status {
        #[arg(long)]
        key: Option<PathBuf>,
        /// The engine's base URL; default: try vLLM, Ollama, LM Studio, llama.cpp on localhost.
        #[arg(long)]
        engine: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            coordinator,
            engine: url,
            key,
            slots,
        } => {
            anyhow::ensure!(
                coordinator.len() <= troop_agent::link::MAX_COORDINATORS,
                "at most {} coordinators",
                troop_agent::link::MAX_COORDINATORS
            );
            let path = key.unwrap_or_else(identity::default_path);
            let (id, created) = identity::load_or_create(&path)?;
            if created {
                tracing::info!(path = %path.display(), "created a new worker identity");
            }
            let candidates = match url {
                Some(u) => vec![(troop_schemas::protocol::EngineKind::OpenAiCompatible, u)],
                None => engine::default_candidates(),
            };
            let found = engine::detect(&engine::client(), &candidates)
                .await
                .context("finding the inference engine")?;
            match gpu::detect(None) {
                gpu::Detection::Gpus(gpus) => {
                    for g in gpus {
                        tracing::info!(name = %g.name, memory_total_mib = g.memory_total_mib, "GPU found by nvidia-smi");
                    }
                }
                gpu::Detection::CpuOnly(why) => {
                    tracing::info!(%why, "no GPU facts: serving in CPU mode");
                }
            }
            tracing::info!(engine = ?found.kind, url = %found.base_url, models = found.models.len(), worker = %id.worker_id(), "engine found");
            let slots = slots.unwrap_or(found.slots).max(1);
            let agent = troop_agent::link::Agent::new(coordinator, found, id, slots);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("draining: finishing running jobs, taking no new ones");
                let _ = stop_tx.send(true);
            });
            troop_agent::link::run(agent, stop_rx).await;
        }
        Command::Keygen { key } => {
            let path = key.unwrap_or_else(identity::default_path);
            let id = identity::create(&path)?;
            println!("{} {}", id.worker_id(), id.public_key());
            eprintln!("key written to {} (mode 0600)", path.display());
        }
        Command::Status {
            key,
            engine: url,
            json,
        } => {
            let path = key.unwrap_or_else(identity::default_path);
            let (id, created) = identity::load_or_create(&path)?;
            if created {
                tracing::info!(path = %path.display(), "created a new worker identity");
            }
            let client = engine::client();
            let candidates = match url {
                Some(u) => vec![(troop_schemas::protocol::EngineKind::OpenAiCompatible, u)],
                None => engine::default_candidates(),
            };
            let found = engine::detect(&client, &candidates)
                .await
                .context("finding the inference engine")?;
            let gpus = match gpu::detect(None) {
                gpu::Detection::Gpus(g) => g,
                gpu::Detection::CpuOnly(why) => {
                    tracing::info!(%why, "no GPU facts: serving in CPU mode");
                    Vec::new()
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "worker": id.worker_id().to_string(), "key": id.public_key().to_string(),
                        "engine": found.kind, "engine_url": found.base_url, "slots": found.slots,
                        "models": found.models, "gpus": gpus,
                    })
                );
            } else {
                println!("worker  {}", id.worker_id());
                println!("key     {}", id.public_key());
                println!(
                    "engine  {:?} at {} ({} slots)",
                    found.kind, found.base_url, found.slots
                );
                for m in &found.models {
                    println!(
                        "model   {}{}",
                        m.name,
                        m.context_length
                            .map(|c| format!(" (context {c})"))
                            .unwrap_or_default()
                    );
                }
                for g in &gpus {
                    println!(
                        "gpu     {} {}/{} MiB, {}%, {}°C",
                        g.name,
                        g.memory_used_mib,
                        g.memory_total_mib,
                        g.utilization_pct,
                        g.temperature_c
                    );
                }
                if gpus.is_empty() {
                    println!("gpu     none (CPU mode)");
                }
            }
        }
    }
    Ok(())
}
