#!/usr/bin/env bash
# Issue 4's throughput benchmark: settled receipts per second through the
# cluster's ledger path (owners' transactional writes to the Kafka ledger
# partitions, then the sequencer: fold, Postgres projection, tiles and signed
# checkpoints in Postgres), against a plain Postgres insert of the same
# entries measured in the same run; then replay (the ledger rebuilt from Kafka
# alone into a second database, compared with the live one). Real noida-db
# broker and Postgres, both on this machine. Usage: ops/bench-sequencer.sh ;
# RECEIPTS, ROUNDS, PARTITIONS, BATCH_PER_PARTITION tune it. Prints one JSON
# line per round.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
receipts="${RECEIPTS:-50000}"
rounds="${ROUNDS:-2}"
partitions="${PARTITIONS:-12}"
batch="${BATCH_PER_PARTITION:-1024}"
# shellcheck source=ops/lib.sh
. ops/lib.sh

echo "== building (release)" >&2
cargo build --release --locked -q -p troop-loadtest
lt="${CARGO_TARGET_DIR:-target}/release/troop-loadtest"
admin="$(ops/postgres.sh ensure)"
port="$(free_port)"
pids+=("$(ops/broker.sh start "$port" noida $$)")
work="$(mktemp -d "${TMPDIR:-/tmp}/troop-bench-seq-XXXXXX")"
for round in $(seq 1 "$rounds"); do
    db="troop_bench_seq_$round"
    for d in "$db" "${db}_replay"; do
        psql "$admin" -qc "drop database if exists $d with (force)" -c "create database $d" >/dev/null 2>&1
    done
    rm -rf "$work/traffic"
    "$lt" sequencer --brokers "127.0.0.1:$port" \
        --postgres "$(echo "$admin" | sed "s/dbname=[^ ]*/dbname=$db/")" \
        --receipts "$receipts" --partitions "$partitions" --batch-per-partition "$batch" \
        --topic-prefix "bench$round" --work-dir "$work/traffic" \
        --replay-into "$(echo "$admin" | sed "s/dbname=[^ ]*/dbname=${db}_replay/")"
    for d in "$db" "${db}_replay"; do
        psql "$admin" -qc "drop database if exists $d with (force)" >/dev/null 2>&1
    done
done
rm -rf "$work"
