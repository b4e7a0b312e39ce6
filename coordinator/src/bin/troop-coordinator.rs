//! `troop-coordinator`: read the configuration, open the books, serve.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use troop_coordinator::config::Config;

#[derive(Parser)]
#[command(
    name = "troop-coordinator",
    version,
    about = "The Troop coordinator (embedded default: event log on local disk)"
)]
struct Cli {
    /// TOML configuration; `TROOP_*` environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API, the worker endpoint and the ledger.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: String,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref(), |k| std::env::var(k).ok())?;
    match cli.command {
        Command::Serve { listen, data_dir } => {
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("binding {listen}"))?;
            actix_web::rt::System::new().block_on(async move {
                let state = troop_coordinator::server::open_state(config)?;
                tracing::info!(addr = %listener.local_addr()?, "serving");
                // Printed for scripts that started us on port 0.
                println!("listening on {}", listener.local_addr()?);
                troop_coordinator::server::serve(state, listener)?.await?;
                Ok(())
            })
        }
    }
}
