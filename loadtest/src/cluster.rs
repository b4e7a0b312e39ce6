//! `troop-loadtest sequencer`: settled receipts per second through the
//! cluster's ledger path — owners' transactional writes to the Kafka ledger
//! partitions, then the sequencer (fold, Postgres projection, tiles and signed
//! checkpoints in Postgres) — with a baseline measured in the same run: the
//! same entries inserted into Postgres in the same batch sizes with nothing
//! else (no Kafka, no fold, no tiles).
//!
//! The traffic is `troop-loadtest ledger`'s (real signed receipts), split the
//! way owners would write it: keys, prices, accounts and workers on partition
//! 0 first (sequenced before the traffic starts, as they would be long before
//! in a live network), then each consumer's holds, settlements, voids and
//! top-ups on its account's partition, in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use troop_coordinator::books::ledger_record as record;
use troop_coordinator::cluster::kafka_log::{KafkaLog, KafkaLogConfig};
use troop_coordinator::cluster::migrate::{connect_postgres, migrate_kafka, migrate_postgres};
use troop_coordinator::cluster::projection::partition_of;
use troop_coordinator::cluster::sequencer::{SequencerProgress, SequencerSettings, SequencerTask};
use troop_coordinator::config::ClusterConfig;
use troop_coordinator::eventlog::EventLog as _;
use troop_ledger::note::NoteSigner;
use troop_ledger::store::DirStore;
use troop_ledger::tile::{self, TILE_WIDTH, TileId, TileSource as _};
use troop_schemas::{AccountId, Event, HoldId, decode_entry};

#[derive(Debug, clap::Args)]
pub struct SequencerArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// libpq connection string of an empty database (migrated here).
    #[arg(long)]
    pub postgres: String,
    /// Settled receipts in the traffic (voided holds and top-ups come on top).
    #[arg(long, default_value_t = 50_000)]
    pub receipts: u64,
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// Records per owner transaction.
    #[arg(long, default_value_t = 2_048)]
    pub produce_batch: usize,
    /// Records the sequencer reads per partition per round.
    #[arg(long, default_value_t = 1_024)]
    pub batch_per_partition: usize,
    /// Topic names start with this; a fresh one per run.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
    /// Where the generated traffic is written first.
    #[arg(long)]
    pub work_dir: PathBuf,
    /// Afterwards, rebuild the ledger from Kafka alone into this empty
    /// database (`troop-coordinator replay`'s code) and compare it with the
    /// live one.
    #[arg(long)]
    pub replay_into: Option<String>,
}

/// Every entry of a log directory written by `troop-loadtest ledger`.
fn read_log(dir: &std::path::Path, size: u64) -> Result<Vec<Vec<u8>>> {
    let store = DirStore::open(dir)?;
    let mut out = Vec::with_capacity(usize::try_from(size)?);
    for t in 0..size.div_ceil(TILE_WIDTH) {
        let width = u16::try_from((size - t * TILE_WIDTH).min(TILE_WIDTH))?;
        let path = TileId::entries(t, width).path();
        let bytes = store
            .read(&path)
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("{path} missing"))?;
        let entries = tile::decode_bundle(&bytes, usize::from(width))
            .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        out.extend(entries.into_iter().map(<[u8]>::to_vec));
    }
    Ok(out)
}

/// Setup on partition 0, then each account's traffic on its own partition.
/// Balance snapshots are left out: they check the fold at one point of the
/// single-node order, which the merge of partitions does not keep.
/// Setup entries, each partition's traffic, and the settled receipts in it.
struct Split {
    setup: Vec<Vec<u8>>,
    traffic: Vec<Vec<Vec<u8>>>,
    receipts: u64,
}

fn split(entries: &[Vec<u8>], partitions: u32) -> Result<Split> {
    let mut setup = Vec::new();
    let mut traffic = vec![Vec::new(); usize::try_from(partitions)?];
    let mut hold_account: HashMap<HoldId, AccountId> = HashMap::new();
    let mut receipts = 0u64;
    let mut traffic_started = false;
    for bytes in entries {
        let event = decode_entry(bytes)?;
        let account = match &event {
            Event::HoldPlaced { hold, account, .. } => {
                traffic_started = true;
                hold_account.insert(*hold, *account);
                Some(*account)
            }
            Event::HoldSettled { hold, .. } => {
                receipts += 1;
                hold_account.get(hold).copied()
            }
            Event::HoldVoided { hold, .. } => hold_account.get(hold).copied(),
            Event::Grant { account, .. } if traffic_started => Some(*account),
            Event::BalanceSnapshot { .. } => continue,
            _ if traffic_started => bail!("unexpected {} in the traffic", event.kind()),
            _ => None,
        };
        match account {
            Some(a) => {
                let p = usize::try_from(partition_of(&a, partitions))?;
                traffic[p].push(bytes.clone());
            }
            None => setup.push(bytes.clone()),
        }
    }
    Ok(Split {
        setup,
        traffic,
        receipts,
    })
}

fn owner(config: &ClusterConfig, partition: i32) -> Result<KafkaLog> {
    Ok(KafkaLog::open(KafkaLogConfig::ledger_owner(
        config, partition,
    ))?)
}

async fn published(progress: &SequencerProgress, size: u64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while progress.published.load(Ordering::SeqCst) < size {
        ensure!(
            Instant::now() < deadline,
            "the sequencer published {} of {size} entries in {limit:?}",
            progress.published.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The same rows as the sequencer's ledger_entries, in the same batch sizes,
/// into a scratch table: what Postgres alone takes.
async fn baseline(
    client: &tokio_postgres::Client,
    traffic: &[Vec<Vec<u8>>],
    batch: usize,
) -> Result<f64> {
    client
        .batch_execute(
            "create temporary table baseline (leaf_index bigint primary key, partition_id int, event_offset bigint, entry bytea)",
        )
        .await?;
    let mut rows: Vec<(i64, i32, i64, &[u8])> = Vec::new();
    for (p, entries) in traffic.iter().enumerate() {
        for (o, e) in entries.iter().enumerate() {
            rows.push((0, i32::try_from(p)?, i64::try_from(o)?, e));
        }
    }
    for (i, r) in rows.iter_mut().enumerate() {
        r.0 = i64::try_from(i)?;
    }
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        let (mut leaf, mut part, mut off, mut entry) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, p, o, e) in chunk {
            leaf.push(*l);
            part.push(*p);
            off.push(*o);
            entry.push(*e);
        }
        client
            .execute(
                "insert into baseline select * from unnest($1::bigint[], $2::int[], $3::bigint[], $4::bytea[])",
                &[&leaf, &part, &off, &entry],
            )
            .await?;
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(args: SequencerArgs) -> Result<serde_json::Value> {
    ensure!(args.partitions > 0, "--partitions must be positive");
    let generated = tokio::task::spawn_blocking({
        let out = args.work_dir.clone();
        let receipts = args.receipts;
        move || {
            crate::ledger::run(&crate::ledger::LedgerArgs {
                out,
                receipts,
                accounts: 1_000,
                workers: 100,
                seed: 1,
                checkpoint_every: 1 << 40,
                origin: "troop.example/ledger".into(),
            })
        }
    })
    .await??;
    let size = generated["entries"].as_u64().context("entries")?;
    let entries = read_log(&args.work_dir.join("log"), size)?;
    let Split {
        setup,
        traffic,
        receipts,
    } = split(&entries, args.partitions)?;
    let traffic_entries: usize = traffic.iter().map(Vec::len).sum();

    let config = ClusterConfig {
        kafka_brokers: args.brokers.clone(),
        postgres: args.postgres.clone(),
        topic_prefix: args.topic_prefix.clone(),
        ledger_partitions: args.partitions,
        worker_partitions: 1,
        replication_factor: 1,
        ..ClusterConfig::default()
    };
    let mut client = connect_postgres(&config).await?;
    migrate_postgres(&mut client).await?;
    migrate_kafka(&config).await?;
    let signer = NoteSigner::new(
        "troop.example/ledger",
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
    )?;
    let mut settings = SequencerSettings::new(config.clone());
    settings.batch_per_partition = args.batch_per_partition;
    settings.idle.first = Duration::from_millis(2);

    // Setup first, sequenced before the traffic is written.
    let cfg = config.clone();
    let setup_len = setup.len() as u64;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let log = owner(&cfg, 0)?;
        for chunk in setup.chunks(2_048) {
            log.append(chunk.iter().map(|e| record(e)).collect())?;
        }
        Ok(())
    })
    .await??;
    let first = SequencerTask::spawn(settings.clone(), signer.clone());
    published(&first.progress, setup_len, Duration::from_secs(120)).await?;
    first.stop().await?;

    // The owners write the traffic, one thread per partition.
    let produce_started = Instant::now();
    let writers: Vec<_> = traffic
        .iter()
        .enumerate()
        .map(|(p, entries)| {
            let cfg = config.clone();
            let records: Vec<Vec<u8>> = entries.iter().map(|e| record(e)).collect();
            let batch = args.produce_batch;
            std::thread::spawn(move || -> Result<()> {
                let log = owner(&cfg, i32::try_from(p)?)?;
                for chunk in records.chunks(batch) {
                    log.append(chunk.to_vec())?;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join()
            .map_err(|_| anyhow::anyhow!("an owner thread panicked"))??;
    }
    let produce_s = produce_started.elapsed().as_secs_f64();

    // The sequencer drains the backlog: fold, projection, tiles, checkpoint.
    let total = setup_len + traffic_entries as u64;
    let sequence_started = Instant::now();
    let second = SequencerTask::spawn(settings, signer.clone());
    published(&second.progress, total, Duration::from_secs(1_800)).await?;
    let sequence_s = sequence_started.elapsed().as_secs_f64();
    second.stop().await?;
    let rows: i64 = client
        .query_one("select count(*) from ledger_entries", &[])
        .await?
        .get(0);
    ensure!(
        u64::try_from(rows)? == total,
        "ledger has {rows} entries, expected {total}"
    );

    let batch = args.batch_per_partition * usize::try_from(args.partitions)?;
    let baseline_per_s = baseline(&client, &traffic, batch).await?;
    let sequencer_per_s = traffic_entries as f64 / sequence_s;
    let replayed = match &args.replay_into {
        Some(into) => Some(replay(&config, into, signer).await?),
        None => None,
    };
    let mut out = serde_json::json!({
        "receipts": receipts,
        "traffic_entries": traffic_entries,
        "partitions": args.partitions,
        "produce_seconds": produce_s,
        "produce_entries_per_s": (traffic_entries as f64 / produce_s).round(),
        "sequence_seconds": sequence_s,
        "sequencer_entries_per_s": sequencer_per_s.round(),
        "sequencer_receipts_per_s": (receipts as f64 / sequence_s).round(),
        "produce_then_sequence_receipts_per_s": (receipts as f64 / (produce_s + sequence_s)).round(),
        "baseline_insert_entries_per_s": baseline_per_s.round(),
        "sequencer_vs_baseline": (sequencer_per_s / baseline_per_s * 1000.0).round() / 1000.0,
    });
    if let Some((seconds, same)) = replayed {
        out["replay_seconds"] = seconds.into();
        out["replay_entries_per_s"] = (total as f64 / seconds).round().into();
        out["replay_same_as_live"] = same.into();
    }
    Ok(out)
}

/// Replays the whole ledger into `into` and compares it with the live
/// database: (seconds the replay took, whether they agree).
async fn replay(config: &ClusterConfig, into: &str, signer: NoteSigner) -> Result<(f64, bool)> {
    let mut target = connect_postgres(&ClusterConfig {
        postgres: into.to_owned(),
        ..config.clone()
    })
    .await?;
    migrate_postgres(&mut target).await?;
    let verifier = signer.verifier();
    let replayed = troop_coordinator::cluster::replay::replay(config, into, signer).await?;
    let (_, _, differences) =
        troop_coordinator::cluster::replay::compare(&config.postgres, into, &verifier).await?;
    for d in &differences {
        eprintln!("replay differs: {d}");
    }
    Ok((replayed.seconds, differences.is_empty()))
}
