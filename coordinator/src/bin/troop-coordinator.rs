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
    /// Operator actions through a running coordinator's admin API.
    Admin {
        #[arg(long, env = "TROOP_URL", default_value = "http://127.0.0.1:8787")]
        url: String,
        #[arg(long, env = "TROOP_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Print the API's JSON answer instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Admin,
    },
    /// Create or update the cluster's Kafka topics and Postgres schema
    /// (`[cluster]` settings); safe to run again and from every node.
    Migrate {
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the cluster's ledger sequencer until interrupted: it leads when no
    /// other node does, and publishes the ledger into Postgres. Needs the
    /// network's ledger key at `<data_dir>/ledger.key`, the same on every node.
    Sequence {
        /// Also serve `/ledger/` (from Postgres, whichever node leads) and
        /// `/metrics` (the sequencer's progress and lag) here.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Rebuild the ledger's projections from Kafka alone (the ledger
    /// partitions and the sequencer's order on `<prefix>.sequence`) into an
    /// empty database, publish it with the ledger key, and compare it with the
    /// live database (`[cluster] postgres`): exits non-zero if they differ.
    Replay {
        /// libpq connection string of the database to rebuild into; it is
        /// migrated first and must not hold a ledger yet.
        #[arg(long)]
        into: String,
        /// Only rebuild; do not compare with the live database.
        #[arg(long)]
        no_compare: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a cluster node (`[cluster]` settings, after `migrate`): the same
    /// API as `serve`, with the books on Kafka and Postgres, shared with the
    /// other nodes. Needs the network's `ledger.key`, `coordinator.key` and
    /// `apikey-hash.key` in `data_dir` (the same on every node) and the
    /// cluster's secret (`TROOP_CLUSTER__SECRET`).
    Node {
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: String,
        /// Unique among the cluster's live nodes; default: host:port listened on.
        #[arg(long)]
        name: Option<String>,
        /// Where the other nodes reach this one; default: http://<listen address>.
        #[arg(long)]
        advertise: Option<String>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Serve the OpenAI API, the worker endpoint and the ledger.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: String,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Admin {
    /// Open an account (consumer unless --worker).
    CreateAccount {
        #[arg(long)]
        worker: bool,
    },
    ListAccounts,
    /// Grant credits from the treasury.
    Grant {
        #[arg(long)]
        account: String,
        #[arg(long)]
        amount_micro: u64,
        #[arg(long, default_value = "")]
        memo: String,
    },
    /// Issue an API key for an account; the secret is shown once.
    CreateKey {
        #[arg(long)]
        account: String,
    },
    RevokeKey {
        #[arg(long)]
        key: String,
    },
    ListWorkers,
    BanWorker {
        #[arg(long)]
        worker: String,
    },
    /// Publish a new price schedule: --price MODEL=INPUT:OUTPUT (micro-credits per 1k tokens), repeatable.
    SetPrices {
        #[arg(long)]
        fee_bps: u64,
        #[arg(long = "price", required = true)]
        prices: Vec<String>,
    },
}

fn admin(url: &str, token: &str, json: bool, action: Admin) -> anyhow::Result<()> {
    use serde_json::{Value, json as j};
    let url = url.trim_end_matches('/');
    let auth = format!("Bearer {token}");
    let request = |method: &str, path: &str| {
        ureq::request(method, &format!("{url}{path}")).set("authorization", &auth)
    };
    let (req, body) = match action {
        Admin::CreateAccount { worker } => (
            request("POST", "/admin/accounts"),
            Some(j!({"role": if worker { "worker" } else { "consumer" }})),
        ),
        Admin::ListAccounts => (request("GET", "/admin/accounts"), None),
        Admin::Grant {
            account,
            amount_micro,
            memo,
        } => (
            request("POST", "/admin/grants"),
            Some(j!({"account": account, "amount_micro": amount_micro, "memo": memo})),
        ),
        Admin::CreateKey { account } => (
            request("POST", "/admin/keys"),
            Some(j!({"account": account})),
        ),
        Admin::RevokeKey { key } => (
            request("POST", "/admin/keys/revoke"),
            Some(j!({"key": key})),
        ),
        Admin::ListWorkers => (request("GET", "/admin/workers"), None),
        Admin::BanWorker { worker } => (
            request("POST", "/admin/workers/ban"),
            Some(j!({"worker": worker})),
        ),
        Admin::SetPrices { fee_bps, prices } => {
            let mut list = Vec::new();
            for p in prices {
                let (model, rest) = p.split_once('=').context("--price MODEL=INPUT:OUTPUT")?;
                let (i, o) = rest.split_once(':').context("--price MODEL=INPUT:OUTPUT")?;
                list.push(j!({"model": model, "input_micro_per_1k": i.parse::<u64>()?, "output_micro_per_1k": o.parse::<u64>()?}));
            }
            (
                request("POST", "/admin/prices"),
                Some(j!({"fee_bps": fee_bps, "prices": list})),
            )
        }
    };
    let answer = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let body: Value = match answer {
        Ok(r) => r.into_json()?,
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = r.into_json().unwrap_or(Value::Null);
            anyhow::bail!(
                "{code}: {}",
                v["error"]["message"].as_str().unwrap_or("request refused")
            );
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{body}");
    } else if let Some(Value::Array(rows)) = body.get("accounts").or_else(|| body.get("workers")) {
        for row in rows {
            let fields: Vec<String> = row
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                    )
                })
                .collect();
            println!("{}", fields.join(" "));
        }
        // A cluster's list names the nodes that did not answer.
        for node in body["nodes"].as_array().into_iter().flatten() {
            if let Some(error) = node["error"].as_str() {
                let name = node["node"].as_str().unwrap_or("?");
                eprintln!("node {name} did not answer: {error}");
            }
        }
        if let Some(error) = body["error"].as_str() {
            eprintln!("only this node's workers are listed: {error}");
        }
    } else {
        for (k, v) in body.as_object().into_iter().flatten() {
            println!(
                "{k}: {}",
                v.as_str().map_or_else(|| v.to_string(), str::to_owned)
            );
        }
    }
    Ok(())
}

fn migrate(cluster: &troop_coordinator::config::ClusterConfig, json: bool) -> anyhow::Result<()> {
    use troop_coordinator::cluster::migrate;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (sql, topics) = runtime.block_on(async {
        let mut client = migrate::connect_postgres(cluster)
            .await
            .context("connecting to postgres")?;
        let sql = migrate::migrate_postgres(&mut client)
            .await
            .context("migrating postgres")?;
        let topics = migrate::migrate_kafka(cluster)
            .await
            .context("creating kafka topics")?;
        anyhow::Ok((sql, topics))
    })?;
    if json {
        let sql: Vec<_> = sql
            .iter()
            .map(|(v, o)| serde_json::json!({"version": v, "outcome": o}))
            .collect();
        let topics: Vec<_> = topics
            .iter()
            .map(|(t, o)| serde_json::json!({"topic": t, "outcome": o}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"migrations": sql, "topics": topics})
        );
    } else {
        for (v, o) in sql {
            println!("migration {v:04}: {o:?}");
        }
        for (t, o) in topics {
            println!("topic {t}: {o:?}");
        }
    }
    Ok(())
}

/// The network's ledger key from `<data_dir>/ledger.key`.
fn ledger_signer(config: &Config) -> anyhow::Result<troop_ledger::note::NoteSigner> {
    // Never created here: a node with a key of its own would sign checkpoints
    // no auditor can follow across a change of leader.
    let seed =
        troop_coordinator::cluster::node::shared_secret(&config.data_dir.join("ledger.key"))?;
    Ok(troop_ledger::note::NoteSigner::new(
        &config.ledger_name,
        ed25519_dalek::SigningKey::from_bytes(&seed),
    )?)
}

fn replay(config: &Config, into: &str, compare: bool, json: bool) -> anyhow::Result<()> {
    use troop_coordinator::cluster::{migrate, replay};
    let signer = ledger_signer(config)?;
    let verifier = signer.verifier();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (replayed, compared) = runtime.block_on(async {
        let target = troop_coordinator::config::ClusterConfig {
            postgres: into.to_owned(),
            ..config.cluster.clone()
        };
        let mut client = migrate::connect_postgres(&target)
            .await
            .context("connecting to the target database")?;
        migrate::migrate_postgres(&mut client)
            .await
            .context("migrating the target database")?;
        let replayed = replay::replay(&config.cluster, into, signer).await?;
        let compared = if compare {
            Some(replay::compare(&config.cluster.postgres, into, &verifier).await?)
        } else {
            None
        };
        anyhow::Ok((replayed, compared))
    })?;
    let cp = &replayed.checkpoint;
    let mut out = serde_json::json!({
        "entries": cp.size,
        "root": cp.root.to_base64(),
        "directory_records": replayed.directory,
        "seconds": replayed.seconds,
        "entries_per_s": (cp.size as f64 / replayed.seconds.max(1e-9)).round(),
    });
    let differences = compared
        .as_ref()
        .map(|(_, _, d)| d.clone())
        .unwrap_or_default();
    if let Some((live, _, differences)) = &compared {
        out["live"] = serde_json::json!({
            "entries": live.tree_size,
            "checkpoint_entries": live.checkpoint.as_ref().map(|c| c.size),
            "root": live.checkpoint.as_ref().map(|c| c.root.to_base64()),
        });
        out["same"] = differences.is_empty().into();
        out["differences"] = differences.clone().into();
    }
    if json {
        println!("{out}");
    } else {
        println!("replayed {} entries, root {}", cp.size, cp.root.to_base64());
        if compared.is_some() && differences.is_empty() {
            println!("the live database holds exactly the same ledger");
        }
        for d in &differences {
            println!("differs: {d}");
        }
    }
    anyhow::ensure!(
        differences.is_empty(),
        "the replayed ledger differs from the live one"
    );
    Ok(())
}

fn sequence(config: &Config, listen: Option<&str>) -> anyhow::Result<()> {
    use troop_coordinator::cluster::sequencer::{self, SequencerProgress, SequencerSettings};
    let signer = ledger_signer(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        let progress = std::sync::Arc::new(SequencerProgress::default());
        let server = match listen {
            Some(addr) => {
                let listener =
                    std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
                tracing::info!(addr = %listener.local_addr()?, "serving /ledger/ and /metrics");
                let node = troop_coordinator::cluster::ledger_node::LedgerNode::new(
                    config.cluster.clone(),
                    std::sync::Arc::clone(&progress),
                );
                let server = troop_coordinator::cluster::ledger_node::serve(node, None, listener)?;
                let handle = server.handle();
                tokio::spawn(server);
                Some(handle)
            }
            None => None,
        };
        tracing::info!(log = %config.ledger_name, "sequencer standing by");
        sequencer::run(
            SequencerSettings {
                previous_log_key: troop_coordinator::server::previous_log_key(
                    &config.data_dir,
                    &config.ledger_name,
                )?,
                ..SequencerSettings::new(config.cluster.clone())
            },
            signer,
            progress,
            stop,
        )
        .await;
        if let Some(server) = server {
            server.stop(true).await;
        }
        anyhow::Ok(())
    })
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
        Command::Admin {
            url,
            token,
            json,
            action,
        } => admin(&url, &token, json, action),
        Command::Migrate { json } => migrate(&config.cluster, json),
        Command::Sequence { listen } => sequence(&config, listen.as_deref()),
        Command::Replay {
            into,
            no_compare,
            json,
        } => replay(&config, &into, !no_compare, json),
        Command::Node {
            listen,
            name,
            advertise,
            data_dir,
        } => {
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            let me = troop_coordinator::cluster::node::NodeIdentity {
                name: name.unwrap_or_else(|| addr.to_string()),
                internal_url: advertise.unwrap_or_else(|| format!("http://{addr}")),
            };
            tracing::info!(%addr, node = %me.name, "serving as a cluster node");
            println!("listening on {addr}");
            actix_web::rt::System::new().block_on(troop_coordinator::cluster::node::serve(
                config, me, listener,
            ))
        }
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
