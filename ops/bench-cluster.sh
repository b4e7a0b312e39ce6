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
# Rounds alternate the setups; medians are reported, with the engine reached
# directly as a floor. Usage: ops/bench-cluster.sh [OUT_DIR] ; ROUNDS and
# CONCURRENCY (space-separated) tune it. Prints one JSON object
# (also written to OUT_DIR/bench-cluster.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${TMPDIR:-/tmp}/troop-bench-cluster}"
rounds="${ROUNDS:-3}"
concurrency="${CONCURRENCY:-1 16 64}"
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=ops/lib.sh
. ops/lib.sh

echo "== building (release)" >&2
cargo build --release --locked -q -p troop-coordinator -p troop-agent -p troop-loadtest
bin="${CARGO_TARGET_DIR:-target}/release"
lt="$bin/troop-loadtest"

agent() { # COORDINATOR_URL NAME
    "$bin/troop-agent" run --coordinator "$1" --engine "$engine" --slots 1024 --key "$out/$2.key" >"$out/$2.log" 2>&1 &
    pids+=("$!")
}
# Prints a bearer key of a new account holding plenty of credits.
consumer_key() { # URL
    local a account
    a() { "$bin/troop-coordinator" admin --url "$1" --token bench-admin --json "${@:2}"; }
    account="$(a "$1" create-account | python3 -c 'import json,sys; print(json.load(sys.stdin)["account"])')"
    a "$1" grant --account "$account" --amount-micro 1000000000000 >/dev/null
    a "$1" create-key --account "$account" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])'
}

echo "== mock engine" >&2
eport="$(free_port)"
"$lt" engine --listen "127.0.0.1:$eport" --token-interval-ms 5 >"$out/engine.log" 2>&1 &
pids+=("$!")
engine="http://127.0.0.1:$eport"
wait_http "$engine/health" "the mock engine"

echo "== embedded coordinator and its agent" >&2
bench_settings "$out/embedded.toml"
port="$(free_port)"
"$bin/troop-coordinator" --config "$out/embedded.toml" serve --listen "127.0.0.1:$port" --data-dir "$out/embedded" >"$out/embedded.log" 2>&1 &
pids+=("$!")
embedded="http://127.0.0.1:$port"
wait_http "$embedded/v1/models" "the embedded coordinator"
agent "$embedded" agent-embedded
wait_models "$embedded"
embedded_key="$(consumer_key "$embedded")"

echo "== two-node cluster (noida-db, PostgreSQL) and its agent on the first node" >&2
pg_admin="$(ops/postgres.sh ensure)"
db="troop_bench_cluster"
psql "$pg_admin" -qc "drop database if exists $db with (force)" -c "create database $db" >/dev/null 2>&1
bport="$(free_port)"
pids+=("$(ops/broker.sh start "$bport" noida $$)")
bench_settings "$out/node.toml" "[cluster]
kafka_brokers = \"127.0.0.1:$bport\"
postgres = \"$(echo "$pg_admin" | sed "s/dbname=[^ ]*/dbname=$db/")\"
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
    node_urls+=("http://127.0.0.1:$port")
    wait_http "http://127.0.0.1:$port/v1/models" "node $n"
done
local_url="${node_urls[0]}"
relay_url="${node_urls[1]}"
agent "$local_url" agent-cluster
wait_models "$local_url"
wait_models "$relay_url"
cluster_key="$(consumer_key "$local_url")"

gateway() { # URL KEY CONCURRENCY REQUESTS
    "$lt" gateway --url "$1" --key "$2" --model mock --concurrency "$3" --requests "$4" --max-tokens 64
}
# Warm every path (connections, first allocations, the account's owner).
gateway "$engine" "" 16 64 >/dev/null
gateway "$embedded" "$embedded_key" 16 64 >/dev/null
gateway "$local_url" "$cluster_key" 16 64 >/dev/null
gateway "$relay_url" "$cluster_key" 16 64 >/dev/null

runs="$out/runs.jsonl"
: >"$runs"
for round in $(seq 1 "$rounds"); do
    for c in $concurrency; do
        n=$((c == 1 ? 32 : c * 8))
        echo "== round $round: $c streams x $n requests: direct, embedded, cluster local, cluster relayed" >&2
        d="$(gateway "$engine" "" "$c" "$n")"
        e="$(gateway "$embedded" "$embedded_key" "$c" "$n")"
        l="$(gateway "$local_url" "$cluster_key" "$c" "$n")"
        r="$(gateway "$relay_url" "$cluster_key" "$c" "$n")"
        python3 -c 'import json,sys; print(json.dumps({"round": int(sys.argv[1]), "concurrency": int(sys.argv[2]), "direct": json.loads(sys.argv[3]), "embedded": json.loads(sys.argv[4]), "local": json.loads(sys.argv[5]), "relayed": json.loads(sys.argv[6])}))' \
            "$round" "$c" "$d" "$e" "$l" "$r" >>"$runs"
    done
done

python3 - "$runs" <<'PY' | tee "$out/bench-cluster.json"
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
result = {}
for c in sorted({r["concurrency"] for r in runs}):
    rs = [r for r in runs if r["concurrency"] == c]
    for r in rs:
        for path in ("direct", "embedded", "local", "relayed"):
            assert r[path]["failed"] == 0, (path, r[path])
    med = lambda f: round(statistics.median(f(r) for r in rs), 3)
    p50 = lambda r, path: r[path]["ttft_ms"]["p50"]
    result[str(c)] = {
        "rounds": len(rs),
        "requests_per_round": rs[0]["embedded"]["requests"],
        "ttft_ms_p50_direct": med(lambda r: p50(r, "direct")),
        "ttft_ms_p50_embedded": med(lambda r: p50(r, "embedded")),
        "ttft_ms_p50_local": med(lambda r: p50(r, "local")),
        "ttft_ms_p50_relayed": med(lambda r: p50(r, "relayed")),
        "ttft_ms_p50_added_local": med(lambda r: p50(r, "local") - p50(r, "embedded")),
        "ttft_ms_p50_added_relayed": med(lambda r: p50(r, "relayed") - p50(r, "embedded")),
        "ttft_ratio_local": med(lambda r: p50(r, "local") / p50(r, "embedded")),
        "ttft_ratio_relayed": med(lambda r: p50(r, "relayed") / p50(r, "embedded")),
        "tokens_per_s_embedded": med(lambda r: r["embedded"]["tokens_per_s"]),
        "tokens_per_s_local": med(lambda r: r["local"]["tokens_per_s"]),
        "tokens_per_s_relayed": med(lambda r: r["relayed"]["tokens_per_s"]),
    }
print(json.dumps(result, indent=1))
PY
psql "$pg_admin" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
