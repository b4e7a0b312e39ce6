# Helpers shared by ops/demo.sh and the ops/bench*.sh scripts (sourced, not run).
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
# A benchmark coordinator's settings, with EXTRA_TOML appended (a [cluster]).
bench_settings() { # FILE [EXTRA_TOML]
    cat >"$1" <<TOML
admin_token = "bench-admin"
heartbeat_interval_ms = 10000
# One account drives every stream: no per-account limits in the way.
[rate_limits]
requests_per_minute = 0
max_in_flight = 0
[[prices]]
model = "mock"
input_micro_per_1k = 100
output_micro_per_1k = 300
${2:-}
TOML
}
# CPU seconds (user + system) used so far by each NAME=PID and its
# descendants (children that exited and were reaped included), as one JSON
# object: what a benchmark reads around a run to charge each process.
cpu_json() { # NAME=PID...
    python3 - "$@" <<'PY'
import json, os, sys
tick = os.sysconf("SC_CLK_TCK")
stats, children = {}, {}
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue  # gone meanwhile
    pid = int(entry)
    stats[pid] = sum(int(f) for f in fields[11:15])
    children.setdefault(int(fields[1]), []).append(pid)
def tree(pid):
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += stats.get(p, 0)
        todo.extend(children.get(p, []))
    return total
print(json.dumps({a.split("=")[0]: tree(int(a.split("=")[1])) / tick for a in sys.argv[1:]}))
PY
}
