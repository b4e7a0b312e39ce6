//! `troop-loadtest`: load generators. Each subcommand prints one JSON line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cluster;
mod engine;
mod gateway;
mod ledger;
mod workers;

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
    /// A mock OpenAI-compatible engine streaming synthetic tokens at a set rate.
    Engine(engine::EngineArgs),
    /// N simulated workers (the real agent protocol, synthetic tokens).
    Workers(workers::WorkersArgs),
    /// Settled receipts per second through Kafka and the cluster's sequencer
    /// into Postgres, against a plain Postgres insert of the same entries.
    Sequencer(cluster::SequencerArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Ledger(args) => println!("{}", ledger::run(&args)?),
        Command::Gateway(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            println!("{}", rt.block_on(gateway::run(args))?);
        }
        Command::Engine(args) => engine::run(&args)?,
        Command::Workers(args) => println!("{}", workers::run(args)?),
        Command::Sequencer(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            println!("{}", rt.block_on(cluster::run(args))?);
        }
    }
    Ok(())
}
