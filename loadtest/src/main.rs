//! `troop-loadtest`: load generators. Each subcommand prints one JSON line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod gateway;
mod ledger;

#[derive(Parser)]
#[command(name = "troop-loadtest", version, about = "Load generators for Troop")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a ledger of synthetic, fully valid traffic with the real writer.
    Ledger(ledger::LedgerArgs),
    /// Concurrent streaming consumers against an OpenAI-compatible URL.
    Gateway(gateway::GatewayArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Ledger(args) => println!("{}", ledger::run(&args)?),
        Command::Gateway(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            println!("{}", rt.block_on(gateway::run(args))?);
        }
    }
    Ok(())
}
