//! `troop-audit`: parse arguments, run the check, print the verdict.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use troop_audit::{Report, Source, read_checkpoint, verify_across_rotation};
use troop_ledger::note::NoteVerifier;
use troop_ledger::proof::TlogProof;
use troop_ledger::tile::TileHashReader;
use troop_schemas::AccountId;

#[derive(Parser)]
#[command(
    name = "troop-audit",
    version,
    about = "Verify a Troop credit ledger from the outside"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every signature, tile, entry, receipt and balance of a log.
    Verify {
        /// A directory holding the log, or an http(s) URL prefix.
        base: String,
        /// The log's verifier key (`name+keyid+base64`), or a file holding it.
        #[arg(long)]
        key: String,
        /// An older checkpoint file: prove the current log extends it.
        #[arg(long)]
        since: Option<String>,
        /// The key that signed the --since checkpoint, when the log's key was
        /// rotated after it (default: --key).
        #[arg(long, requires = "since")]
        since_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check one entry's inclusion proof offline.
    Proof {
        /// A `c2sp.org/tlog-proof@v1` file.
        proof: String,
        /// The entry's bytes.
        #[arg(long)]
        entry: String,
        #[arg(long)]
        key: String,
    },
    /// Write the inclusion proof of entry INDEX against the log's current checkpoint.
    Prove {
        base: String,
        #[arg(long)]
        index: u64,
        #[arg(long)]
        key: String,
        /// Also write the entry's bytes to this file.
        #[arg(long)]
        entry_out: Option<String>,
    },
    /// Replay the log and print balances.
    Balances {
        base: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        account: Option<AccountId>,
        #[arg(long)]
        json: bool,
    },
}

fn load_key(arg: &str) -> Result<NoteVerifier> {
    let text = if std::path::Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("reading key file {arg}"))?
    } else {
        arg.to_owned()
    };
    NoteVerifier::from_key_string(&text).context("parsing the verifier key")
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {pos}/{len} entries [{elapsed_precise}] {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn run_verify(
    base: &str,
    key: &NoteVerifier,
    since: Option<(&str, &NoteVerifier)>,
) -> Result<Report, troop_audit::AuditError> {
    let source = Source::open(base)?;
    let bar = progress_bar();
    if let Ok((_, cp)) = read_checkpoint(&source, key) {
        bar.set_length(cp.size);
    }
    let result = verify_across_rotation(&source, key, since, &|n| bar.set_position(n));
    bar.finish_and_clear();
    result
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("troop-audit: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Verify {
            base,
            key,
            since,
            since_key,
            json,
        } => {
            let key = load_key(&key)?;
            let since_key = since_key.as_deref().map(load_key).transpose()?;
            let since = since
                .map(|f| std::fs::read_to_string(&f).with_context(|| format!("reading {f}")))
                .transpose()?;
            let started = std::time::Instant::now();
            let since = since
                .as_deref()
                .map(|note| (note, since_key.as_ref().unwrap_or(&key)));
            match run_verify(&base, &key, since) {
                Ok(r) => {
                    let secs = started.elapsed().as_secs_f64();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "ok": true, "size": r.entries, "root": r.checkpoint.root.to_base64(),
                                "receipts": r.receipts, "signatures": r.signatures,
                                "accounts": r.ledger.accounts().count(), "open_holds": r.ledger.open_holds().count(),
                                "holds_priced_stale": r.ledger.holds_priced_stale(),
                                "since_size": r.since_size, "seconds": secs,
                            })
                        );
                    } else {
                        println!(
                            "OK: {} entries, {} receipts ({} signatures), {} accounts, {} open holds{}; root {}{} ({secs:.1} s)",
                            r.entries,
                            r.receipts,
                            r.signatures,
                            r.ledger.accounts().count(),
                            r.ledger.open_holds().count(),
                            // Valid, but a coordinator that lagged behind a new schedule.
                            match r.ledger.holds_priced_stale() {
                                0 => String::new(),
                                n => format!(", {n} holds priced at a replaced schedule"),
                            },
                            r.checkpoint.root,
                            r.since_size
                                .map(|s| format!("; extends the checkpoint of size {s}"))
                                .unwrap_or_default(),
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "error": e.to_string()})
                        );
                    }
                    eprintln!("FAIL: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Proof { proof, entry, key } => {
            let key = load_key(&key)?;
            let text =
                std::fs::read_to_string(&proof).with_context(|| format!("reading {proof}"))?;
            let entry_bytes = std::fs::read(&entry).with_context(|| format!("reading {entry}"))?;
            let verdict = TlogProof::parse(&text)
                .map_err(anyhow::Error::from)
                .and_then(|p| {
                    let cp = p.verify(&entry_bytes, &key)?;
                    Ok((p.index, cp))
                });
            match verdict {
                Ok((index, cp)) => {
                    let kind = troop_schemas::decode_entry(&entry_bytes)
                        .map(|e| e.kind())
                        .unwrap_or("not a ledger entry");
                    println!(
                        "OK: entry {index} ({kind}) is in {} at size {}",
                        cp.origin, cp.size
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("FAIL: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Prove {
            base,
            index,
            key,
            entry_out,
        } => {
            let key = load_key(&key)?;
            let source = Source::open(&base)?;
            let (note, cp) = read_checkpoint(&source, &key)?;
            let reader = TileHashReader::new(&source, cp.size);
            let proof = TlogProof::build(&reader, &note, &cp, index)?;
            if let Some(path) = entry_out {
                let bundle_id = troop_ledger::tile::TileId::for_size(None, index / 256, cp.size)
                    .context("index beyond the log")?;
                let bytes = troop_ledger::tile::TileSource::read(&source, &bundle_id.path())
                    .map_err(anyhow::Error::msg)?
                    .context("entry bundle missing")?;
                let entries =
                    troop_ledger::tile::decode_bundle(&bytes, usize::from(bundle_id.width))?;
                let i = usize::try_from(index % 256).context("index")?;
                std::fs::write(&path, entries[i]).with_context(|| format!("writing {path}"))?;
            }
            print!("{}", proof.to_text());
            Ok(ExitCode::SUCCESS)
        }
        Command::Balances {
            base,
            key,
            account,
            json,
        } => {
            let key = load_key(&key)?;
            let report = match run_verify(&base, &key, None) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("FAIL: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let mut rows: Vec<_> = report
                .ledger
                .accounts()
                .filter(|(id, _)| account.is_none_or(|a| a == **id))
                .map(|(id, a)| (*id, a.balance(), a.debits_pending, a.available()))
                .collect();
            if let Some(a) = account
                && rows.is_empty()
            {
                eprintln!("FAIL: account {a} is not in the log");
                return Ok(ExitCode::FAILURE);
            }
            rows.sort_by_key(|r| r.0);
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(id, bal, pend, avail)| {
                        serde_json::json!({"account": id.to_string(), "balance_micro": bal.to_string(),
                            "pending_micro": pend.to_string(), "available_micro": avail.to_string()})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"size": report.entries, "root": report.checkpoint.root.to_base64(), "accounts": list})
                );
            } else {
                // A reader that stops early (`| head`) is not an error.
                let mut out = std::io::stdout().lock();
                let mut write_rows = || -> std::io::Result<()> {
                    writeln!(
                        out,
                        "{:<38} {:>20} {:>16} {:>20}",
                        "account", "balance_micro", "pending_micro", "available_micro"
                    )?;
                    for (id, bal, pend, avail) in &rows {
                        writeln!(out, "{id:<38} {bal:>20} {pend:>16} {avail:>20}")?;
                    }
                    Ok(())
                };
                match write_rows() {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                    _ => {}
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
