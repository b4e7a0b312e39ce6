//! Coordinator settings: TOML file, then `TROOP_*` environment overrides.

use std::path::PathBuf;

use serde::Deserialize;

use crate::api::openai::Limits;

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub model: String,
    pub input_micro_per_1k: u64,
    pub output_micro_per_1k: u64,
}

#[derive(Debug, Clone, Deserialize)]
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
    /// No job runs longer than this.
    pub job_deadline_ms: u64,
    /// How long a hold may stay open (it is voided by its request long before).
    pub hold_ttl_ms: u64,
    /// Attempts on different workers before the first byte.
    pub max_attempts: usize,
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
            job_deadline_ms: 600_000,
            hold_ttl_ms: 3_600_000,
            max_attempts: 3,
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

    /// Reads `path` (if given), then applies `TROOP_DATA_DIR`, `TROOP_ADMIN_TOKEN`,
    /// `TROOP_LEDGER_NAME` and `TROOP_FEE_BPS` from the environment.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let mut c: Config = match path {
            Some(p) => toml::from_str(&std::fs::read_to_string(p)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            None => Config::default(),
        };
        if let Some(v) = env("TROOP_DATA_DIR") {
            c.data_dir = v.into();
        }
        if let Some(v) = env("TROOP_ADMIN_TOKEN") {
            c.admin_token = v;
        }
        if let Some(v) = env("TROOP_LEDGER_NAME") {
            c.ledger_name = v;
        }
        if let Some(v) = env("TROOP_FEE_BPS") {
            c.fee_bps = v
                .parse()
                .map_err(|_| anyhow::anyhow!("TROOP_FEE_BPS must be an integer"))?;
        }
        anyhow::ensure!(c.fee_bps <= 10_000, "fee_bps must be at most 10000");
        Ok(c)
    }
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
    }
}
