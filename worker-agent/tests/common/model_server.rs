//! A real llama.cpp server with a real model, started by ops/model-server.sh
//! and killed on drop. Shared by the agent's and the coordinator's tests.
#![allow(
    dead_code,
    reason = "each test binary that includes this uses a different part"
)]

use std::path::PathBuf;
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct ModelServer {
    pid: String,
    port: u16,
}

impl ModelServer {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let script = repo_root().join("ops/model-server.sh");
        let out = Command::new(script)
            .args(["start", &port.to_string(), "--slots", "2"])
            .output()
            .expect("model-server.sh runs");
        assert!(
            out.status.success(),
            "model server failed to start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            pid: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

/// The venv holding the model server and the official `openai` SDK.
pub fn venv() -> PathBuf {
    let out = Command::new(repo_root().join("ops/model-server.sh"))
        .arg("venv")
        .output()
        .expect("model-server.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
