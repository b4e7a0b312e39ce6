//! Starting a coordinator in-process and driving its HTTP API from tests.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troop_coordinator::config::Config;

/// Serves `config` on a free loopback port from its own actix system; returns
/// the base URL once it answers.
pub fn start_in_process(config: Config) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    troop_coordinator::server::spawn(config, listener).expect("coordinator opens");
    wait_until_ready(&url);
    url
}

/// Until the coordinator at `url` takes consumer requests (`/health/ready`),
/// as a load balancer would wait before sending it any.
pub fn wait_until_ready(url: &str) {
    wait_for("the coordinator to be ready", || {
        ureq::get(&format!("{url}/health/ready")).call().is_ok()
    });
}

pub fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    wait_for_up_to(what, Duration::from_secs(30), ok);
}

pub fn wait_for_up_to(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Until a worker has announced a model.
pub fn wait_for_models(url: &str) {
    wait_for("a worker's models", || {
        ureq::get(&format!("{url}/v1/models"))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v["data"].as_array().is_some_and(|d| !d.is_empty()))
    });
}

pub fn admin_get(url: &str, token: &str, path: &str) -> Value {
    ureq::get(&format!("{url}{path}"))
        .set("authorization", &format!("Bearer {token}"))
        .call()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_json()
        .expect("json")
}

/// Posts an admin call; a 503 (nothing done: a node starting, an owner
/// moving) is asked again after its Retry-After, as a client would.
pub fn admin(url: &str, token: &str, path: &str, body: Value) -> Value {
    for _ in 0..10 {
        match ureq::post(&format!("{url}{path}"))
            .set("authorization", &format!("Bearer {token}"))
            .send_json(body.clone())
        {
            Ok(r) => return r.into_json().expect("json"),
            Err(ureq::Error::Status(503, r)) => {
                let wait_s: u64 = r
                    .header("retry-after")
                    .and_then(|s| s.parse().ok())
                    .expect("a 503 says when to retry");
                eprintln!(
                    "{path}: 503 ({}), retried in {wait_s} s",
                    r.into_string().unwrap_or_default()
                );
                std::thread::sleep(Duration::from_secs(wait_s));
            }
            Err(ureq::Error::Status(code, r)) => {
                panic!("{path}: {code} {}", r.into_string().unwrap_or_default())
            }
            Err(e) => panic!("{path}: {e}"),
        }
    }
    panic!("{path}: still 503 after 10 tries")
}

/// Opens an account, grants it `grant_micro` and issues a key: (account, key).
pub fn consumer(url: &str, admin_token: &str, grant_micro: u64) -> (String, String) {
    let account = admin(url, admin_token, "/admin/accounts", json!({}))["account"]
        .as_str()
        .expect("account")
        .to_owned();
    admin(
        url,
        admin_token,
        "/admin/grants",
        json!({"account": account, "amount_micro": grant_micro}),
    );
    let key = admin(url, admin_token, "/admin/keys", json!({"account": account}))["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    (account, key)
}

pub fn account(url: &str, key: &str) -> Value {
    ureq::get(&format!("{url}/v1/account"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .expect("account")
        .into_json()
        .expect("json")
}

/// Admin token of coordinators started by [`start_process`].
pub const PROCESS_ADMIN: &str = "process-admin";

/// A coordinator process (the real binary), killed with SIGKILL on drop.
pub struct Coordinator(pub Child, pub String);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the coordinator binary on `dir`, with `PROCESS_ADMIN` as admin token and a
/// price for the scripted model.
pub fn start_process(dir: &std::path::Path) -> Coordinator {
    let config = dir.join("troop.toml");
    std::fs::write(
        &config,
        format!("admin_token = \"{PROCESS_ADMIN}\"\nheartbeat_interval_ms = 1000\n[[prices]]\nmodel = \"{}\"\ninput_micro_per_1k = 1000\noutput_micro_per_1k = 10000\n", super::scripted::MODEL),
    )
    .expect("config");
    let data = dir.join("data");
    let data = data.to_str().expect("utf-8 path");
    start_binary(
        &config,
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", data],
    )
}

/// Runs the coordinator binary with `--config config` and `args` (a
/// command that serves); returns it once it says where it listens. Its log
/// goes to `config` with the extension `log`.
/// Prints the tail of each log in its list if the test panics while it is
/// alive: what the node processes said, for the failure's report.
pub struct LogsOnPanic(pub Vec<std::path::PathBuf>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("--- {}:\n{}", path.display(), tail.join("\n"));
        }
    }
}

pub fn start_binary(config: &std::path::Path, args: &[&str]) -> Coordinator {
    let log = std::fs::File::create(config.with_extension("log")).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log)
        .env("NO_COLOR", "1")
        .spawn()
        .expect("coordinator starts");
    // It prints `listening on ADDR` once serving.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains('\n') {
        assert!(
            stdout.read(&mut byte).expect("read") == 1,
            "coordinator exited: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&seen).into_owned();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_owned();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    Coordinator(child, format!("http://{addr}"))
}
