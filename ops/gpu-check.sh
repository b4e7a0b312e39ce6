#!/usr/bin/env bash
# The agent's GPU facts, end to end, against what nvidia-smi itself says:
# `troop-agent status --json`, then the facts the coordinator received in the
# agent's heartbeats (admin list-workers), then one request served through them.
# Uses the mock engine, so it needs no model. On a machine without nvidia-smi it
# checks CPU mode instead (no GPU facts, said in the agent's log).
# Usage: ops/gpu-check.sh [OUT_DIR]; TROOP_BIN=DIR takes prebuilt binaries
# (a GPU machine without a Rust toolchain) instead of building them.
# Prints one JSON object (also written to OUT_DIR/gpu-check.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${TMPDIR:-/tmp}/troop-gpu-check}"
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=ops/lib.sh
. ops/lib.sh

if [ -n "${TROOP_BIN:-}" ]; then
    bin="$TROOP_BIN"
else
    cargo build --release --locked -q -p troop-coordinator -p troop-agent -p troop-loadtest
    bin="${CARGO_TARGET_DIR:-target}/release"
fi

# nvidia-smi's own answer, asked exactly as the agent asks it.
query="name,memory.total,memory.used,utilization.gpu,temperature.gpu"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu="$query" --format=csv,noheader,nounits >"$out/nvidia-smi.csv"
    nvidia-smi -L >"$out/nvidia-smi-L.txt"
    nvidia-smi >"$out/nvidia-smi.txt" || true
    mode=gpu
else
    : >"$out/nvidia-smi.csv"
    mode=cpu
fi

eport="$(free_port)"
"$bin/troop-loadtest" engine --listen "127.0.0.1:$eport" --token-interval-ms 1 >"$out/engine.log" 2>&1 &
pids+=("$!")
engine="http://127.0.0.1:$eport"
wait_http "$engine/health" "the mock engine"
"$bin/troop-agent" status --json --engine "$engine" --key "$out/worker.key" >"$out/status.json" 2>"$out/status.log"

cport="$(free_port)"
curl="http://127.0.0.1:$cport"
cat >"$out/troop.toml" <<TOML
admin_token = "gpu-check"
heartbeat_interval_ms = 500
[[prices]]
model = "mock"
input_micro_per_1k = 100
output_micro_per_1k = 300
TOML
"$bin/troop-coordinator" --config "$out/troop.toml" serve --listen "127.0.0.1:$cport" --data-dir "$out/data" \
    >"$out/coordinator.log" 2>&1 &
pids+=("$!")
wait_http "$curl/v1/models" "the coordinator"
"$bin/troop-agent" run --coordinator "$curl" --engine "$engine" --key "$out/worker.key" >"$out/agent.log" 2>&1 &
pids+=("$!")
wait_models "$curl"
admin() { "$bin/troop-coordinator" admin --url "$curl" --token gpu-check --json "$@"; }
sleep 1.2 # a heartbeat after the first, so utilization and temperature are fresh ones
admin list-workers >"$out/workers.json"
account="$(admin create-account | python3 -c 'import json,sys; print(json.load(sys.stdin)["account"])')"
admin grant --account "$account" --amount-micro 100000000 >/dev/null
key="$(admin create-key --account "$account" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')"
"$bin/troop-loadtest" gateway --url "$curl" --key "$key" --model mock --concurrency 4 --requests 16 \
    --max-tokens 16 >"$out/gateway.json"

python3 - "$mode" "$out" <<'PY' | tee "$out/gpu-check.json"
import json, sys
mode, out = sys.argv[1], sys.argv[2]
smi = [[f.strip() for f in l.split(",")] for l in open(f"{out}/nvidia-smi.csv") if l.strip()]
status = json.load(open(f"{out}/status.json"))
workers = json.load(open(f"{out}/workers.json"))["workers"]
gateway = json.load(open(f"{out}/gateway.json"))
agent_log = open(f"{out}/agent.log").read()
assert len(workers) == 1, workers
seen = workers[0]["gpus"]
def same(gpus):
    # Names and total memory are fixed; used memory, load and temperature move.
    return [(g["name"], g["memory_total_mib"]) for g in gpus] == [(r[0], int(r[1])) for r in smi]
if mode == "gpu":
    assert smi, "nvidia-smi listed no GPU"
    assert same(status["gpus"]), ("troop-agent status", status["gpus"], smi)
    assert same(seen), ("coordinator's view", seen, smi)
    assert "CPU mode" not in agent_log, agent_log
    assert agent_log.count("GPU found by nvidia-smi") == len(smi), agent_log
else:
    assert status["gpus"] == [] and seen == [], (status, seen)
    assert "no GPU facts: serving in CPU mode" in agent_log, agent_log
assert gateway["ok"] == 16 and gateway["failed"] == 0, gateway
print(json.dumps({"mode": mode, "nvidia_smi": smi, "agent_status_gpus": status["gpus"],
                  "coordinator_gpus": seen, "engine": workers[0]["engine"],
                  "requests_ok": gateway["ok"]}))
PY
