#!/usr/bin/env bash
# The main job on the embedded default, on one machine, no external service:
# starts a real model server if no engine is running (llama.cpp + SmolLM2-135M
# from PyPI), the coordinator and an agent; opens an account with credits and an
# API key; streams a chat completion with the official OpenAI SDK; then audits
# the published ledger with troop-audit and proves the request's receipt is in it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${TMPDIR:-/tmp}/troop-demo}"
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=ops/lib.sh
. ops/lib.sh

echo "== building"
cargo build --release --locked -q -p troop-coordinator -p troop-agent -p troop-audit
bin="${CARGO_TARGET_DIR:-target}/release"
venv="$(ops/model-server.sh venv)"

echo "== engine"
engine_args=()
if "$bin/troop-agent" status --key "$out/probe.key" >/dev/null 2>&1; then
    echo "using the engine already running on this machine"
else
    port="$(free_port)"
    pids+=("$(ops/model-server.sh start "$port")")
    engine_args=(--engine "http://127.0.0.1:$port")
    echo "started llama.cpp with SmolLM2-135M on port $port"
fi
models_json="$("$bin/troop-agent" status --json --key "$out/worker.key" "${engine_args[@]}")"
model="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["models"][0]["name"])' "$models_json")"

echo "== coordinator"
admin_token="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
cat >"$out/troop.toml" <<TOML
admin_token = "$admin_token"
fee_bps = 500
heartbeat_interval_ms = 2000
[[prices]]
model = "$model"
input_micro_per_1k = 1000
output_micro_per_1k = 3000
TOML
cport="$(free_port)"
url="http://127.0.0.1:$cport"
"$bin/troop-coordinator" --config "$out/troop.toml" serve --listen "127.0.0.1:$cport" --data-dir "$out/data" \
    >"$out/coordinator.log" 2>&1 &
pids+=("$!")
wait_http "$url/v1/models" "the coordinator"
echo "coordinator on $url (data in $out/data)"

echo "== agent"
"$bin/troop-agent" run --coordinator "$url" --key "$out/worker.key" "${engine_args[@]}" >"$out/agent.log" 2>&1 &
pids+=("$!")
wait_models "$url"
echo "worker online, serving $model"

echo "== a consumer streams a chat completion (official OpenAI SDK)"
"$venv/bin/python" ops/demo_client.py "$url" "$admin_token" "$model" | tee "$out/client.out"
receipt="$(tail -1 "$out/client.out")"

echo "== audit: the published ledger, verified from the outside"
sleep 1.5 # a fresh checkpoint is signed every second
"$bin/troop-audit" verify "$url/ledger" --key "$out/data/ledger.vkey"
size="$(python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode().split("\n")[1])' "$url/ledger/checkpoint")"
index=$((size - 1))
while [ "$index" -ge 0 ]; do
    "$bin/troop-audit" prove "$url/ledger" --index "$index" --key "$out/data/ledger.vkey" --entry-out "$out/entry" >"$out/receipt.tlog-proof"
    grep -q "\"job\":\"$receipt\"" "$out/entry" && grep -q '"kind":"hold_settled"' "$out/entry" && break
    index=$((index - 1))
done
echo "receipt $receipt is ledger entry $index; checking its inclusion proof offline:"
"$bin/troop-audit" proof "$out/receipt.tlog-proof" --entry "$out/entry" --key "$out/data/ledger.vkey"
