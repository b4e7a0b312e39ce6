# Helpers shared by ops/demo.sh and ops/bench.sh (sourced, not run).
# Processes started into `pids` are killed when the script exits.
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # URL, what
    for _ in $(seq 1 150); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "timed out waiting for $2" >&2; exit 1
}
# Until the coordinator at URL lists a model (a worker is online).
wait_models() { # URL
    for _ in $(seq 1 100); do
        python3 -c 'import json,sys,urllib.request; sys.exit(0 if json.load(urllib.request.urlopen(sys.argv[1]))["data"] else 1)' "$1/v1/models" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "timed out waiting for a worker at $1" >&2; exit 1
}
