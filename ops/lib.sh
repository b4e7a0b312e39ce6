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
# What reaches the broker on PORT over SECONDS, by client connection: TCP
# segments received per second (`ss -ti`'s segs_in on the broker's side; a
# small Kafka request is one segment), each connection named by the NAME of
# the NAME=PID process that holds its other end, busiest first, as JSON.
broker_traffic() { # PORT SECONDS NAME=PID...
    python3 - "$@" <<'PY'
import json, re, subprocess, sys, time
port, seconds = sys.argv[1], float(sys.argv[2])
names = {a.split("=")[1]: a.split("=")[0] for a in sys.argv[3:]}
def ss(option, where):
    return subprocess.run(["ss", "-tn", option, "state", "established", where], capture_output=True, text=True, check=True).stdout
def segments():  # peer port -> segments the broker received from it
    out, peer = {}, None
    for line in ss("-i", f"( sport = :{port} )").splitlines()[1:]:
        if not line[:1].isspace():  # a connection; its details follow indented
            m = re.search(r":\d+\s+\S+:(\d+)\s*$", line)
            peer = m.group(1) if m else None
        elif peer and (s := re.search(r"segs_in:(\d+)", line)):
            out[peer], peer = int(s.group(1)), None
    return out
before, started = segments(), time.monotonic()
time.sleep(seconds)
after, elapsed = segments(), time.monotonic() - started
holder = {}
for line in ss("-p", f"( dport = :{port} )").splitlines()[1:]:
    if m := re.search(r"\S+:(\d+)\s+\S+:\d+\s+users:\(\(\"[^\"]*\",pid=(\d+)", line):
        holder[m.group(1)] = names.get(m.group(2), f"pid {m.group(2)}")
rows = sorted(((after[p] - before.get(p, 0)) / elapsed, holder.get(p, "?"), p) for p in after)[::-1]
print(json.dumps({
    "seconds": round(elapsed, 1),
    "segments_per_s": round(sum(r[0] for r in rows), 1),
    "connections": [{"client": c, "port": int(p), "segments_per_s": round(s, 1)} for s, c, p in rows if s >= 0.5],
}))
PY
}
