#!/usr/bin/env bash
# Issue 4's latency benchmark: time to first token of a streamed chat request
# on the cluster path against the embedded default, measured in one run. The
# same mock engine (troop-loadtest engine, 5 ms before every token) serves
# three setups, each with one troop-agent in front of it:
#   embedded  one `troop-coordinator serve` (the baseline);
#   local     a two-node cluster (`troop-coordinator node` on a real noida-db
#             broker and PostgreSQL), the consumer on the agent's node;
#   relayed   the same cluster, the consumer on the other node (its request
#             relayed to the agent's node and streamed back).
# Each cluster path runs twice: with an account owned by the consumer's node
# (`_own`: its hold judged in-process) and with one owned by the other node
# (`_remote_owner`: the hold judged over the internal API), so a path pays
# 0 (local_own), 1 (local_remote_owner, relayed_own) or 2
# (relayed_remote_owner) internal hops before its first token.
# Rounds alternate the setups; medians are reported, with the engine reached
# directly as a floor, and the mean of each step before the first token
# (`troop_request_phase_seconds` on the consumer's node, read before and after
# every run), and the CPU (user + system) each process used per request
# (engine, coordinators, agents, broker, PostgreSQL with its backends; the
# load generator not counted). First, before any load, IDLE_S seconds (30)
# of the idle cluster: the broker's traffic by client connection, each
# process's CPU a second and PostgreSQL's transactions, scans and writes a
# second by table, then for half as long each connection's Kafka client
# (`client.id`) and requests by API (traced with strace, where there is one).
# Usage: ops/bench-cluster.sh [OUT_DIR] ; ROUNDS, CONCURRENCY (space-separated)
# and IDLE_S tune it; BIN=DIR takes the binaries from DIR instead of
# building. Prints one JSON object (also written to
# OUT_DIR/bench-cluster.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${TMPDIR:-/tmp}/troop-bench-cluster}"
rounds="${ROUNDS:-3}"
concurrency="${CONCURRENCY:-1 16 64}"
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=ops/lib.sh
. ops/lib.sh

binaries
lt="$bin/troop-loadtest"

# Processes charged for CPU around each run, as NAME=PID.
charged=()
agent() { # COORDINATOR_URL NAME
    "$bin/troop-agent" run --coordinator "$1" --engine "$engine" --slots 1024 --key "$out/$2.key" >"$out/$2.log" 2>&1 &
    pids+=("$!")
    charged+=("$2=$!")
}
admin() { # URL ARGS...
    "$bin/troop-coordinator" admin --url "$1" --token bench-admin --json "${@:2}"
}
# Prints the id of a new account holding plenty of credits.
funded_account() { # URL
    local account
    account="$(admin "$1" create-account | python3 -c 'import json,sys; print(json.load(sys.stdin)["account"])')"
    admin "$1" grant --account "$account" --amount-micro 1000000000000 >/dev/null
    echo "$account"
}
# Prints a new bearer key of ACCOUNT.
key_of() { # URL ACCOUNT
    admin "$1" create-key --account "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])'
}
# Prints a bearer key of a new account holding plenty of credits.
consumer_key() { # URL
    key_of "$1" "$(funded_account "$1")"
}

echo "== mock engine" >&2
eport="$(free_port)"
"$lt" engine --listen "127.0.0.1:$eport" --token-interval-ms 5 >"$out/engine.log" 2>&1 &
pids+=("$!")
charged+=("engine=$!")
engine="http://127.0.0.1:$eport"
wait_http "$engine/health" "the mock engine"

echo "== embedded coordinator and its agent" >&2
bench_settings "$out/embedded.toml"
port="$(free_port)"
"$bin/troop-coordinator" --config "$out/embedded.toml" serve --listen "127.0.0.1:$port" --data-dir "$out/embedded" >"$out/embedded.log" 2>&1 &
pids+=("$!")
charged+=("embedded=$!")
embedded="http://127.0.0.1:$port"
wait_http "$embedded/v1/models" "the embedded coordinator"
agent "$embedded" agent-embedded
wait_models "$embedded"
embedded_key="$(consumer_key "$embedded")"

echo "== two-node cluster (noida-db, PostgreSQL) and its agent on the first node" >&2
pg_admin="$(ops/postgres.sh ensure)"
charged+=("postgres=$(head -1 "$(psql "$pg_admin" -Atc 'show data_directory')/postmaster.pid")")
db="troop_bench_cluster"
psql "$pg_admin" -qc "drop database if exists $db with (force)" -c "create database $db" >/dev/null 2>&1
pg_db="$(echo "$pg_admin" | sed "s/dbname=[^ ]*/dbname=$db/")"
bport="$(free_port)"
pids+=("$(ops/broker.sh start "$bport" noida $$)")
charged+=("broker=${pids[-1]}")
bench_settings "$out/node.toml" "[cluster]
kafka_brokers = \"127.0.0.1:$bport\"
postgres = \"$pg_db\"
topic_prefix = \"bench\"
ledger_partitions = 4
worker_partitions = 1
replication_factor = 1
secret = \"$(python3 -c 'import secrets; print(secrets.token_hex(32))')\""
"$bin/troop-coordinator" --config "$out/node.toml" migrate >"$out/migrate.log" 2>&1
# The network's keys: one copy on every node.
mkdir -p "$out/node-a" "$out/node-b"
for f in ledger.key coordinator.key apikey-hash.key; do
    python3 -c 'import secrets; print(secrets.token_hex(32))' >"$out/node-a/$f"
    cp "$out/node-a/$f" "$out/node-b/$f"
done
chmod 600 "$out"/node-*/*.key
node_urls=()
for n in a b; do
    port="$(free_port)"
    "$bin/troop-coordinator" --config "$out/node.toml" node --listen "127.0.0.1:$port" --name "node-$n" --data-dir "$out/node-$n" >"$out/node-$n.log" 2>&1 &
    pids+=("$!")
    charged+=("node-$n=$!")
    node_urls+=("http://127.0.0.1:$port")
    wait_http "http://127.0.0.1:$port/v1/models" "node $n"
done
local_url="${node_urls[0]}"
relay_url="${node_urls[1]}"
agent "$local_url" agent-cluster
wait_models "$local_url"
wait_models "$relay_url"
# The node that owns ACCOUNT (judges its holds), once the ledger has it.
owner_of() { # ACCOUNT
    local node
    for _ in $(seq 1 100); do
        node="$(psql "$pg_db" -Atc \
            "select o.node from accounts a join partition_owners o on o.partition_id = a.ledger_partition where a.account = '$1'")"
        [ -n "$node" ] && { echo "$node"; return 0; }
        sleep 0.1
    done
    echo "no owner for $1" >&2; exit 1
}
# A bearer key of a new account owned by NODE: accounts are made until one
# hashes to a partition NODE owns.
owned_key() { # NODE
    local account
    for _ in $(seq 1 32); do
        account="$(funded_account "$local_url")"
        if [ "$(owner_of "$account")" = "$1" ]; then
            key_of "$local_url" "$account"
            return 0
        fi
    done
    echo "no account owned by $1 in 32 tries" >&2; exit 1
}
key_a="$(owned_key node-a)"
key_b="$(owned_key node-b)"

# Before any load: what the idle cluster asks of its broker (its clients'
# reading loops) and the CPU each process spends a second meanwhile.
idle_s="${IDLE_S:-30}"
echo "== ${idle_s} s idle: the broker's traffic by client connection" >&2
cpu_before="$(cpu_json "${charged[@]}")"
pg_before="$(pg_counters "$pg_db")"
traffic="$(broker_traffic "$bport" "$idle_s" "${charged[@]}")"
cpu_after="$(cpu_json "${charged[@]}")"
pg_after="$(pg_counters "$pg_db")"
pg_idle="$(pg_rate "$pg_before" "$pg_after" "$idle_s")"
# Then, traced (so after the CPU was read), which Kafka client each
# connection is.
clients="$(broker_clients "$bport" "$(( (idle_s + 1) / 2 ))")"
idle="$(python3 -c '
import json, sys
traffic, before, after, clients, pg = (json.loads(a) for a in sys.argv[1:])
traffic["cpu_ms_per_s"] = {p: round(1e3 * (after[p] - before[p]) / traffic["seconds"], 1) for p in after}
traffic["postgres"] = pg
for c in traffic["connections"]:
    c.update(clients.get("clients", {}).get(str(c["port"]), {}))
print(json.dumps(traffic))' "$traffic" "$cpu_before" "$cpu_after" "$clients" "$pg_idle")"

# One run through URL with KEY, with the mean of each phase on URL's node
# (and the serving side's relay_* steps from the first node, which has the
# worker) and each process's CPU per request (the load generator's not
# counted).
measured() { # URL KEY CONCURRENCY REQUESTS
    local before serving_before run means serving cpu_before cpu_after
    before="$(phases "$1")"
    serving_before="$(phases "$local_url")"
    cpu_before="$(cpu_json "${charged[@]}")"
    run="$(gateway "$@")"
    cpu_after="$(cpu_json "${charged[@]}")"
    means="$(phase_means "$before" "$(phases "$1")")"
    serving="$(phase_means "$serving_before" "$(phases "$local_url")")"
    python3 -c '
import json, sys
run, means, serving, cpu_before, cpu_after = (json.loads(a) for a in sys.argv[1:])
run["phase_ms_mean"] = {**means, **{p: serving.get(p, 0.0) for p in ("relay_placed", "relay_first_byte")}}
run["cpu_ms_per_request"] = {
    p: round(1e3 * (cpu_after[p] - cpu_before[p]) / max(1, run["ok"]), 3) for p in cpu_after
}
print(json.dumps(run))' "$run" "$means" "$serving" "$cpu_before" "$cpu_after"
}
# Warm every path (connections, first allocations, the accounts' owners).
gateway "$engine" "" 16 64 >/dev/null
gateway "$embedded" "$embedded_key" 16 64 >/dev/null
for url in "$local_url" "$relay_url"; do
    gateway "$url" "$key_a" 16 64 >/dev/null
    gateway "$url" "$key_b" 16 64 >/dev/null
done

runs="$out/runs.jsonl"
: >"$runs"
for round in $(seq 1 "$rounds"); do
    for c in $concurrency; do
        n=$((c == 1 ? 32 : c * 8))
        echo "== round $round: $c streams x $n requests: direct, embedded, cluster local and relayed (owner here, owner elsewhere)" >&2
        d="$(gateway "$engine" "" "$c" "$n")"
        e="$(measured "$embedded" "$embedded_key" "$c" "$n")"
        l0="$(measured "$local_url" "$key_a" "$c" "$n")"
        l1="$(measured "$local_url" "$key_b" "$c" "$n")"
        r1="$(measured "$relay_url" "$key_b" "$c" "$n")"
        r2="$(measured "$relay_url" "$key_a" "$c" "$n")"
        python3 -c 'import json,sys; a = sys.argv; print(json.dumps({"round": int(a[1]), "concurrency": int(a[2]), "direct": json.loads(a[3]), "embedded": json.loads(a[4]), "local_own": json.loads(a[5]), "local_remote_owner": json.loads(a[6]), "relayed_own": json.loads(a[7]), "relayed_remote_owner": json.loads(a[8])}))' \
            "$round" "$c" "$d" "$e" "$l0" "$l1" "$r1" "$r2" >>"$runs"
    done
done

python3 - "$runs" "$idle" <<'PY' | tee "$out/bench-cluster.json"
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
result = {"idle": json.loads(sys.argv[2])}
for c in sorted({r["concurrency"] for r in runs}):
    rs = [r for r in runs if r["concurrency"] == c]
    paths = ("local_own", "local_remote_owner", "relayed_own", "relayed_remote_owner")
    for r in rs:
        for path in ("direct", "embedded") + paths:
            assert r[path]["failed"] == 0, (path, r[path])
    med = lambda f: round(statistics.median(f(r) for r in rs), 3)
    p50 = lambda r, path: r[path]["ttft_ms"]["p50"]
    out = {
        "rounds": len(rs),
        "requests_per_round": rs[0]["embedded"]["requests"],
        "ttft_ms_p50_direct": med(lambda r: p50(r, "direct")),
    }
    for path in ("embedded",) + paths:
        out[f"ttft_ms_p50_{path}"] = med(lambda r: p50(r, path))
    for path in paths:
        out[f"ttft_ms_p50_added_{path}"] = med(lambda r: p50(r, path) - p50(r, "embedded"))
        out[f"ttft_ratio_{path}"] = med(lambda r: p50(r, path) / p50(r, "embedded"))
    for path in ("embedded",) + paths:
        out[f"tokens_per_s_{path}"] = med(lambda r: r[path]["tokens_per_s"])
        out[f"phase_ms_mean_{path}"] = {
            p: med(lambda r: r[path]["phase_ms_mean"][p]) for p in rs[0][path]["phase_ms_mean"]
        }
        cpu = rs[0][path]["cpu_ms_per_request"]
        out[f"cpu_ms_per_request_{path}"] = {p: med(lambda r: r[path]["cpu_ms_per_request"][p]) for p in cpu}
        out[f"cpu_ms_per_request_{path}"]["all"] = med(lambda r: sum(r[path]["cpu_ms_per_request"].values()))
    result[str(c)] = out
print(json.dumps(result, indent=1))
PY
psql "$pg_admin" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
