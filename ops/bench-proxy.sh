#!/usr/bin/env bash
# Baseline for issue 3's proxy cost: the same mock engine and load as
# ops/bench.sh, directly and through a plain nginx reverse proxy (one worker,
# buffering off, keep-alive upstream), in one run. Installs Debian's nginx if
# missing. Prints one JSON line per round and concurrency.
# Usage: ops/bench-proxy.sh [OUT_DIR] ; ROUNDS tunes it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${TMPDIR:-/tmp}/troop-bench-proxy}"
rounds="${ROUNDS:-3}"
rm -rf "$out" && mkdir -p "$out"
# shellcheck source=ops/lib.sh
. ops/lib.sh
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
cargo build --release --locked -q -p troop-loadtest
lt="${CARGO_TARGET_DIR:-target}/release/troop-loadtest"
cpu_s() { python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"; }

eport="$(free_port)"
nport="$(free_port)"
"$lt" engine --listen "127.0.0.1:$eport" --token-interval-ms 5 >"$out/engine.log" 2>&1 &
pids+=("$!")
wait_http "http://127.0.0.1:$eport/health" "the mock engine"
cat >"$out/nginx.conf" <<CONF
worker_processes 1;
daemon off;
error_log $out/error.log;
pid $out/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  tcp_nodelay on;
  upstream engine { server 127.0.0.1:$eport; keepalive 512; }
  server {
    listen 127.0.0.1:$nport;
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
CONF
nginx -c "$out/nginx.conf" -p "$out" &
pids+=("$!")
wait_http "http://127.0.0.1:$nport/health" "nginx"
worker="$(pgrep -P "$(cat "$out/nginx.pid")" | head -1)"

gateway() { "$lt" gateway --url "$1" --key unused --model mock --concurrency "$2" --requests "$3" --max-tokens 64; }
gateway "http://127.0.0.1:$eport" 64 128 >/dev/null
gateway "http://127.0.0.1:$nport" 64 128 >/dev/null
for round in $(seq 1 "$rounds"); do
    for c in 1 64 256; do
        n=$((c == 1 ? 32 : c * 8))
        d="$(gateway "http://127.0.0.1:$eport" "$c" "$n")"
        c0="$(cpu_s "$worker")"
        v="$(gateway "http://127.0.0.1:$nport" "$c" "$n")"
        c1="$(cpu_s "$worker")"
        python3 -c 'import json,sys; d=json.loads(sys.argv[3]); v=json.loads(sys.argv[4]); assert d["failed"] == 0 and v["failed"] == 0; print(json.dumps({"round": int(sys.argv[1]), "concurrency": int(sys.argv[2]), "throughput_ratio": v["tokens_per_s"]/d["tokens_per_s"], "ttft_ms_p50_direct": d["ttft_ms"]["p50"], "ttft_ms_p50_via": v["ttft_ms"]["p50"], "nginx_cpu_ms_per_request": 1e3*(float(sys.argv[6])-float(sys.argv[5]))/v["ok"]}))' \
            "$round" "$c" "$d" "$v" "$c0" "$c1" | tee -a "$out/runs.jsonl"
    done
done
