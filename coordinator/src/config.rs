//! Coordinator settings: TOML file, then `TROOP_*` environment overrides.
//!
//! Every setting can be overridden from the environment: `fee_bps` by
//! `TROOP_FEE_BPS`, a setting in a table by its path joined with `__`
//! (`TROOP_RATE_LIMITS__REQUESTS_PER_MINUTE`). Lists (`prices`) come from the
//! file or the admin API only.

use std::path::PathBuf;

use serde::Deserialize;

use crate::api::openai::Limits;
use crate::domain::ratelimit::RateLimits;

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub model: String,
    pub input_micro_per_1k: u64,
    pub output_micro_per_1k: u64,
}

/// Where the cluster's shared services are and how its topics are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Kafka bootstrap servers, `host:port,host:port`.
    pub kafka_brokers: String,
    /// A libpq connection string (`host=… user=… dbname=…`).
    pub postgres: String,
    /// Topic names start with this (`troop.ledger`, …): several networks, or
    /// tests, can share one Kafka.
    pub topic_prefix: String,
    /// Accounts are spread over this many ledger partitions, each owned by one
    /// node at a time. Fixed once the topic exists: changing it would move
    /// accounts between partitions.
    pub ledger_partitions: u32,
    /// Partitions of the worker and job topics.
    pub worker_partitions: u32,
    /// Copies of each partition (3 in production, with min.insync.replicas=2).
    pub replication_factor: u32,
    /// The nodes' shared secret for their internal API (at least 16
    /// characters; whoever holds it can move money): set it by
    /// `TROOP_CLUSTER__SECRET` rather than in a file others can read.
    /// (Serialized like every setting: the environment overrides only what
    /// the serialized defaults name.)
    pub secret: String,
    /// How many steps (nice values, 0–19) below the request path the node's
    /// background work runs: its log readers, history producer and consumer,
    /// sequencer and history projector (cluster::priority). 0 leaves them
    /// level.
    pub background_nice: i32,
}

impl ClusterConfig {
    /// The full name of one of the cluster's topics (`ledger`, `sequence`, …).
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.topic_prefix)
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            kafka_brokers: "127.0.0.1:9092".into(),
            postgres: "host=127.0.0.1 user=troop dbname=troop".into(),
            topic_prefix: "troop".into(),
            ledger_partitions: 12,
            worker_partitions: 12,
            replication_factor: 1,
            secret: String::new(),
            background_nice: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Event log, ledger and keys live here.
    pub data_dir: PathBuf,
    /// Bearer token of the admin API; empty disables it.
    pub admin_token: String,
    /// Origin line of the ledger's checkpoints and name of its key.
    pub ledger_name: String,
    /// Network fee, in basis points of each charge.
    pub fee_bps: u64,
    pub prices: Vec<PriceConfig>,
    pub max_messages: usize,
    pub default_max_tokens: u64,
    pub max_tokens: u64,
    pub max_body_bytes: usize,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// A worker that sends nothing for this long after taking a job is replaced.
    pub first_byte_deadline_ms: u64,
    /// A consumer that takes none of its job's output for this long loses the
    /// job: waiting longer would stall the worker's other jobs on its connection.
    pub slow_consumer_ms: u64,
    /// No job runs longer than this.
    pub job_deadline_ms: u64,
    /// How long a hold may stay open (it is voided by its request long before).
    pub hold_ttl_ms: u64,
    /// Attempts on different workers before the first byte.
    pub max_attempts: usize,
    /// Per-account request limits (429 beyond them).
    pub rate_limits: RateLimits,
    /// How often an account's actor checks whether it is idle (nothing in
    /// flight, a full bucket) and retires: memory follows the accounts in use.
    pub account_idle_check_ms: u64,
    /// HTTP worker threads; 0 means one per core.
    pub http_workers: usize,
    /// Heartbeats are logged as one summary per worker per epoch of this length.
    pub heartbeat_epoch_ms: u64,
    /// Kafka and Postgres, for a cluster of coordinators (see CLUSTER.md).
    pub cluster: ClusterConfig,
    /// A snapshot of every projection after this many more event-log records
    /// (start-up replays only what follows the newest); 0 turns it off.
    pub snapshot_every_records: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("troop-data"),
            admin_token: String::new(),
            ledger_name: "troop.local/ledger".into(),
            fee_bps: 500,
            prices: Vec::new(),
            max_messages: 1024,
            default_max_tokens: 1024,
            max_tokens: 32_768,
            max_body_bytes: 8 << 20,
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 30_000,
            first_byte_deadline_ms: 30_000,
            slow_consumer_ms: 30_000,
            job_deadline_ms: 600_000,
            hold_ttl_ms: 3_600_000,
            max_attempts: 3,
            rate_limits: RateLimits::default(),
            account_idle_check_ms: 60_000,
            http_workers: 0,
            heartbeat_epoch_ms: 60_000,
            cluster: ClusterConfig::default(),
            snapshot_every_records: 100_000,
        }
    }
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_messages: self.max_messages,
            default_max_tokens: self.default_max_tokens,
            max_tokens: self.max_tokens,
        }
    }

    /// Reads `path` (if given), then applies `TROOP_*` overrides from `env`.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let mut table: toml::Table = match path {
            Some(p) => toml::from_str(&std::fs::read_to_string(p)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            None => toml::Table::new(),
        };
        let defaults = toml::Table::try_from(Config::default())?;
        apply_env(&mut table, &defaults, "TROOP_", &env)?;
        let c: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| anyhow::anyhow!("settings: {e}"))?;
        anyhow::ensure!(c.fee_bps <= 10_000, "fee_bps must be at most 10000");
        anyhow::ensure!(c.max_attempts >= 1, "max_attempts must be at least 1");
        anyhow::ensure!(
            c.heartbeat_epoch_ms >= 1_000,
            "heartbeat_epoch_ms must be at least 1000"
        );
        Ok(c)
    }
}

/// Overrides each scalar setting named in `defaults` from `PREFIX` + its
/// upper-cased name, parsed as the default's type.
fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    prefix: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    for (key, default) in defaults {
        let name = format!("{prefix}{}", key.to_uppercase());
        if let toml::Value::Table(sub) = default {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(entry) = entry else {
                anyhow::bail!("setting `{key}` must be a table");
            };
            apply_env(entry, sub, &format!("{name}__"), env)?;
            continue;
        }
        let Some(raw) = env(&name) else { continue };
        let value = match default {
            toml::Value::Integer(_) => toml::Value::Integer(
                raw.trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name} must be a whole number, not {raw:?}"))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(
                raw.trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name} must be true or false, not {raw:?}"))?,
            ),
            toml::Value::String(_) => toml::Value::String(raw),
            // Lists of tables (prices) are not set from one variable.
            _ => continue,
        };
        table.insert(key.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("troop.toml");
        std::fs::write(&path, "fee_bps = 250\n[[prices]]\nmodel = \"m\"\ninput_micro_per_1k = 1\noutput_micro_per_1k = 2\n").expect("write");
        let c = Config::load(Some(&path), |k| {
            (k == "TROOP_ADMIN_TOKEN").then(|| "t".to_owned())
        })
        .expect("loads");
        assert_eq!(
            (c.fee_bps, c.admin_token.as_str(), c.prices.len()),
            (250, "t", 1)
        );
        std::fs::write(&path, "fee_bps = 250\nsurprise = 1\n").expect("write");
        assert!(
            Config::load(Some(&path), |_| None).is_err(),
            "unknown settings are refused"
        );
        assert!(
            Config::load(None, |k| (k == "TROOP_FEE_BPS").then(|| "20000".to_owned())).is_err()
        );
        let c = Config::load(Some(&std::path::PathBuf::from("/dev/null")), |k| match k {
            "TROOP_DATA_DIR" => Some("/srv/troop".into()),
            "TROOP_MAX_TOKENS" => Some("4096".into()),
            "TROOP_RATE_LIMITS__REQUESTS_PER_MINUTE" => Some("5".into()),
            _ => None,
        })
        .expect("every setting from the environment");
        assert_eq!(
            (
                c.data_dir.to_str(),
                c.max_tokens,
                c.rate_limits.requests_per_minute,
                c.rate_limits.burst
            ),
            (Some("/srv/troop"), 4096, 5, RateLimits::default().burst)
        );
        let bad = Config::load(None, |k| {
            (k == "TROOP_HEARTBEAT_INTERVAL_MS").then(|| "soon".to_owned())
        });
        assert!(
            bad.expect_err("refused")
                .to_string()
                .contains("TROOP_HEARTBEAT_INTERVAL_MS")
        );
    }

    /// The production node settings shipped in `ops/` load as they are,
    /// with the secrets the units and the compose file put in the
    /// environment.
    #[test]
    fn the_shipped_node_settings_load() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/cluster/node.toml");
        let c = Config::load(Some(&path), |k| match k {
            "TROOP_CLUSTER__SECRET" => Some("a long cluster secret".into()),
            "TROOP_CLUSTER__POSTGRES" => Some("host=db user=troop password=x dbname=troop".into()),
            _ => None,
        })
        .expect("ops/cluster/node.toml loads");
        assert_eq!(c.cluster.replication_factor, 3);
        assert_eq!(c.cluster.secret, "a long cluster secret");
        assert!(c.cluster.postgres.contains("password=x"));
        assert!(!c.prices.is_empty());
    }
}
