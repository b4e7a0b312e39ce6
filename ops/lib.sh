# Helpers shared by ops/demo.sh and the ops/bench*.sh scripts (sourced, not run).
# Processes started into `pids` are stopped when the script exits, and waited
# for (then killed after 10 s): a node still shutting down would otherwise
# write into the next run's freshly made database.
pids=()
alive() { # PID: running (an exited child not yet reaped is a zombie, not alive)
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "${stat##*) }" != Z* ]]
}
cleanup() {
    local p _ left
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 100); do
        left=0
        for p in "${pids[@]}"; do alive "$p" && left=1; done
        ((left)) || return 0
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# Sets `bin`: the release binaries, built here, or taken from $BIN (to
# compare two builds in one session).
binaries() {
    if [[ -n "${BIN:-}" ]]; then
        bin="$BIN"
    else
        echo "== building (release)" >&2
        cargo build --release --locked -q -p troop-coordinator -p troop-agent -p troop-loadtest
        bin="${CARGO_TARGET_DIR:-target}/release"
    fi
}
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
# PostgreSQL's counters for one database (transactions, and scans and row
# writes per table), to diff over a window: pg_rate BEFORE AFTER SECONDS.
# The statistics reach these views within about a second of each commit.
pg_counters() { # CONNINFO
    psql "$1" -Atc "select json_build_object(
        'transactions', (select xact_commit + xact_rollback from pg_stat_database where datname = current_database()),
        'scans', (select coalesce(json_object_agg(relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), '{}') from pg_stat_user_tables),
        'writes', (select coalesce(json_object_agg(relname, n_tup_ins + n_tup_upd + n_tup_del), '{}') from pg_stat_user_tables))"
}
pg_rate() { # BEFORE_JSON AFTER_JSON SECONDS
    python3 -c '
import json, sys
before, after, seconds = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
rate = lambda k: {t: round((n - before[k].get(t, 0)) / seconds, 2) for t, n in sorted(after[k].items()) if n != before[k].get(t, 0)}
print(json.dumps({"transactions_per_s": round((after["transactions"] - before["transactions"]) / seconds, 1),
                  "scans_per_s": rate("scans"), "writes_per_s": rate("writes")}))' "$@"
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
# Which Kafka client holds each connection to the broker on PORT: the
# processes holding them are traced for SECONDS (strace on their sendmsg
# calls) and the request headers they send decoded, giving per client port
# its `client.id` (which a node sets per role: CLUSTER.md, "Kafka clients")
# and its requests a second by API, as JSON; `{}` without strace. Tracing
# stops the traced processes at every system call: never around a timed or
# CPU-measured window.
broker_clients() { # PORT SECONDS
    command -v strace >/dev/null || { echo '{}'; return 0; }
    python3 - "$@" <<'PY'
import collections, json, os, re, shutil, signal, subprocess, sys, tempfile, time
port, seconds = sys.argv[1], float(sys.argv[2])
API = {0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit",
       9: "OffsetFetch", 10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat",
       13: "LeaveGroup", 14: "SyncGroup", 18: "ApiVersions", 19: "CreateTopics",
       22: "InitProducerId", 24: "AddPartitionsToTxn", 25: "AddOffsetsToTxn",
       26: "EndTxn", 28: "TxnOffsetCommit"}
held = {}  # client port -> (pid, fd)
out = subprocess.run(["ss", "-tnp", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True).stdout
for line in out.splitlines()[1:]:
    if m := re.search(r"\S+:(\d+)\s+\S+:\d+\s+users:\(\(\"[^\"]*\",pid=(\d+),fd=(\d+)", line):
        held[m.group(1)] = (m.group(2), m.group(3))
tmp, traces = tempfile.mkdtemp(), []
for pid in sorted({p for p, _ in held.values()}):
    path = os.path.join(tmp, pid)
    traces.append((pid, path, subprocess.Popen(
        ["strace", "-f", "-qq", "-xx", "-s", "96", "-e", "trace=sendmsg,sendto,writev", "-o", path, "-p", pid],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
started = time.monotonic()
time.sleep(seconds)
elapsed = time.monotonic() - started
for _, _, proc in traces:
    proc.send_signal(signal.SIGINT)
    proc.wait()
# A request's header: size i32, API key i16, version i16, correlation id
# i32, client id (i16 length + bytes). A call that goes on with a request
# sent in part does not parse as one and is skipped.
clients, requests = {}, collections.defaultdict(collections.Counter)
call = re.compile(r"^(?:\d+\s+)?(?:sendmsg|sendto|writev)\((\d+),")
for pid, path, _ in traces:
    for line in open(path, errors="replace"):
        m = call.match(line)
        if not m:
            continue
        data = b""
        for piece in re.finditer(r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?', line):
            data += bytes.fromhex(piece.group(1).replace("\\x", ""))
            if piece.group(2):
                break
        if len(data) < 14:
            continue
        api, length = int.from_bytes(data[4:6], "big"), int.from_bytes(data[12:14], "big", signed=True)
        if api not in API or not 0 <= length <= 255 or len(data) < 14 + length:
            continue
        key = (pid, m.group(1))
        clients[key] = data[14:14 + length].decode(errors="replace")
        requests[key][API[api]] += 1
shutil.rmtree(tmp)
print(json.dumps({
    "seconds": round(elapsed, 1),
    "clients": {
        p: {"client_id": clients.get(k, "?"), "requests_per_s": {a: round(n / elapsed, 1) for a, n in requests[k].most_common()}}
        for p, k in held.items()
    },
}))
PY
}
# `troop_request_phase_seconds` sums and counts at URL (a coordinator's
# /metrics), as JSON: a benchmark reads it around a run for each step's mean.
phases() { # URL
    python3 - "$1/metrics" <<'PY'
import json, re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1]).read().decode()
out = {}
for m in re.finditer(r'^troop_request_phase_seconds_(sum|count)\{phase="(\w+)"\} (\S+)$', text, re.M):
    out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
print(json.dumps(out))
PY
}
# Each step's mean time (ms) between two readings of `phases`, as JSON.
phase_means() { # BEFORE_JSON AFTER_JSON
    python3 -c '
import json, sys
before, after = (json.loads(a) for a in sys.argv[1:])
zero = {"sum": 0.0, "count": 0.0}
print(json.dumps({
    p: round(1e3 * (a["sum"] - before.get(p, zero)["sum"]) / max(1.0, a["count"] - before.get(p, zero)["count"]), 3)
    for p, a in after.items()
}))' "$1" "$2"
}
# C streaming consumers against URL's OpenAI API with KEY (comma-separated
# keys spread the consumers over them), N requests of 64 tokens from the
# benchmark's mock model, through troop-loadtest at $lt: its JSON.
gateway() { # URL KEY C N
    "$lt" gateway --url "$1" --key "$2" --model mock --concurrency "$3" --requests "$4" --max-tokens 64
}
