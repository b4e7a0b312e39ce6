#!/usr/bin/env bash
# Issue 3's benchmarks, measured in one run on this machine: the same mock
# engine (troop-loadtest engine, 5 ms between tokens) reached directly and
# through coordinator + agent with auth, holds, receipts and the ledger on;
# then N simulated workers on one coordinator and its peak memory.
# Usage: ops/bench.sh [OUT_DIR] ; ROUNDS, WORKERS, WORKERS_HOLD_S tune it;
# ACCOUNTS (default 1) spreads the consumers over that many accounts, a key
# each (consumer i uses account i mod ACCOUNTS). BIN=DIR takes the binaries
# from DIR instead of building (to compare two builds in one session).
# Each concurrency also reports the mean of every step before the first token
# (`troop_request_phase_seconds`, read before and after each run through the
# coordinator). Prints one JSON object (also written to OUT_DIR/bench.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${TMPDIR:-/tmp}/troop-bench}"
rounds="${ROUNDS:-3}"
workers="${WORKERS:-10000}"
workers_hold_s="${WORKERS_HOLD_S:-60}"
accounts="${ACCOUNTS:-1}"
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=ops/lib.sh
. ops/lib.sh
# CPU seconds (user + system) a process has used so far.
cpu_s() { cpu_json "p=$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["p"])'; }
peak_rss_mib() { awk '/VmHWM/ {print $2/1024}' "/proc/$1/status"; }

binaries
lt="$bin/troop-loadtest"

start_coordinator() { # DIR -> sets curl, cpid
    local dir="$1" port
    port="$(free_port)"
    bench_settings "$dir.toml"
    "$bin/troop-coordinator" --config "$dir.toml" serve --listen "127.0.0.1:$port" --data-dir "$dir" >"$dir.log" 2>&1 &
    cpid=$!
    pids+=("$cpid")
    curl="http://127.0.0.1:$port"
    wait_http "$curl/v1/models" "the coordinator"
}
admin() { "$bin/troop-coordinator" admin --url "$curl" --token bench-admin --json "$@"; }

echo "== mock engine, coordinator, agent" >&2
eport="$(free_port)"
"$lt" engine --listen "127.0.0.1:$eport" --token-interval-ms 5 >"$out/engine.log" 2>&1 &
epid=$!
pids+=("$epid")
engine="http://127.0.0.1:$eport"
wait_http "$engine/health" "the mock engine"
start_coordinator "$out/coordinator"
"$bin/troop-agent" run --coordinator "$curl" --engine "$engine" --slots 1024 --key "$out/worker.key" >"$out/agent.log" 2>&1 &
apid=$!
pids+=("$apid")
wait_models "$curl"
keys=()
for _ in $(seq 1 "$accounts"); do
    account="$(admin create-account | python3 -c 'import json,sys; print(json.load(sys.stdin)["account"])')"
    admin grant --account "$account" --amount-micro 1000000000000 >/dev/null
    keys+=("$(admin create-key --account "$account" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')")
done
key="$(IFS=,; echo "${keys[*]}")"

# Warm both paths (connections, first allocations) before measuring.
gateway "$engine" "" 64 128 >/dev/null
gateway "$curl" "$key" 64 128 >/dev/null

runs="$out/runs.jsonl"
: >"$runs"
for round in $(seq 1 "$rounds"); do
    # 1 stream: the latency floor; 64 and 256: the targets.
    for c in 1 64 256; do
        n=$((c == 1 ? 32 : c * 8))
        echo "== round $round: $c streams x $n requests, direct then via the coordinator" >&2
        d="$(gateway "$engine" "" "$c" "$n")"
        p0="$(phases "$curl")"
        cpu0="$(cpu_json "coordinator=$cpid" "agent=$apid")"
        v="$(gateway "$curl" "$key" "$c" "$n")"
        cpu1="$(cpu_json "coordinator=$cpid" "agent=$apid")"
        pm="$(phase_means "$p0" "$(phases "$curl")")"
        python3 -c 'import json,sys; a = sys.argv; c0, c1 = json.loads(a[5]), json.loads(a[6]); print(json.dumps({"round": int(a[1]), "concurrency": int(a[2]), "direct": json.loads(a[3]), "via": json.loads(a[4]), "coordinator_cpu_s": c1["coordinator"] - c0["coordinator"], "agent_cpu_s": c1["agent"] - c0["agent"], "phase_ms_mean": json.loads(a[7])}))' \
            "$round" "$c" "$d" "$v" "$cpu0" "$cpu1" "$pm" >>"$runs"
    done
done
coordinator_rss_mib="$(peak_rss_mib "$cpid")"
# The coordinator's whole /metrics at the end, for a reader.
curl -fsS "$curl/metrics" >"$out/metrics.txt" || true
kill "$apid" "$cpid" 2>/dev/null || true

echo "== $workers simulated workers on a fresh coordinator, ${workers_hold_s} s at 10 s heartbeats" >&2
start_coordinator "$out/coordinator-workers"
idle_rss_mib="$(peak_rss_mib "$cpid")"
w0="$(cpu_s "$cpid")"
w="$("$lt" workers --coordinator "$curl" --engine "$engine" --count "$workers" --hold-s "$workers_hold_s" 2>"$out/workers.log")"
w1="$(cpu_s "$cpid")"
workers_rss_mib="$(peak_rss_mib "$cpid")"

python3 - "$runs" "$w" "$idle_rss_mib" "$workers_rss_mib" "$coordinator_rss_mib" "$(python3 -c "print($w1-$w0)")" <<'PY' | tee "$out/bench.json"
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
result = {"accounts": runs[0]["via"]["keys"], "streams": {}}
for c in sorted({r["concurrency"] for r in runs}):
    rs = [r for r in runs if r["concurrency"] == c]
    for r in rs:
        assert r["via"]["failed"] == 0 and r["direct"]["failed"] == 0, r
    med = lambda f: statistics.median(f(r) for r in rs)
    result["streams"][str(c)] = {
        "rounds": len(rs),
        "requests_per_round": rs[0]["via"]["requests"],
        "ttft_ms_p50_direct": med(lambda r: r["direct"]["ttft_ms"]["p50"]),
        "ttft_ms_p50_via": med(lambda r: r["via"]["ttft_ms"]["p50"]),
        "ttft_ms_p50_added": med(lambda r: r["via"]["ttft_ms"]["p50"] - r["direct"]["ttft_ms"]["p50"]),
        "tokens_per_s_direct": med(lambda r: r["direct"]["tokens_per_s"]),
        "tokens_per_s_via": med(lambda r: r["via"]["tokens_per_s"]),
        "throughput_ratio": med(lambda r: r["via"]["tokens_per_s"] / r["direct"]["tokens_per_s"]),
        "coordinator_cpu_ms_per_request": med(lambda r: 1e3 * r["coordinator_cpu_s"] / r["via"]["ok"]),
        "agent_cpu_ms_per_request": med(lambda r: 1e3 * r["agent_cpu_s"] / r["via"]["ok"]),
        # Median over the rounds of each run's mean time in the step.
        "phase_ms_mean": {p: med(lambda r: r["phase_ms_mean"][p]) for p in rs[0]["phase_ms_mean"]},
    }
result["coordinator_peak_rss_mib_streams"] = float(sys.argv[5])
result["workers"] = json.loads(sys.argv[2])
result["workers"]["coordinator_idle_rss_mib"] = float(sys.argv[3])
result["workers"]["coordinator_peak_rss_mib"] = float(sys.argv[4])
result["workers"]["coordinator_cpu_s"] = float(sys.argv[6])
print(json.dumps(result, indent=1))
PY
