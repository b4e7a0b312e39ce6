#!/usr/bin/env bash
# The main job, as far as it exists: until the coordinator lands (issue 3) this
# writes a ledger of synthetic but fully valid, signed traffic with the real log
# writer, audits it from the outside with troop-audit, and checks one receipt's
# inclusion proof offline. No external service is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${TMPDIR:-/tmp}/troop-demo}"
receipts="${RECEIPTS:-10000}"
rm -rf "$out"
cargo build --release --locked -q -p troop-loadtest -p troop-audit
bin="${CARGO_TARGET_DIR:-target}/release"

echo "== writing a ledger of $receipts settled receipts to $out/log"
"$bin/troop-loadtest" ledger --out "$out" --receipts "$receipts"

echo "== auditing it: checkpoint signature, every tile and entry, every receipt signature, the fold"
"$bin/troop-audit" verify "$out/log" --key "$out/vkey"

echo "== proving the last settled receipt is in the log, offline"
index=$(( $(sed -n 2p "$out/log/checkpoint") - 1 ))
while :; do
    "$bin/troop-audit" prove "$out/log" --index "$index" --key "$out/vkey" --entry-out "$out/entry" > "$out/entry.tlog-proof"
    grep -q '"kind":"hold_settled"' "$out/entry" && break
    index=$((index - 1))
done
"$bin/troop-audit" proof "$out/entry.tlog-proof" --entry "$out/entry" --key "$out/vkey"

echo "== balances of the first accounts"
"$bin/troop-audit" balances "$out/log" --key "$out/vkey" | head -5
