#!/usr/bin/env bash
# The test command (README.md): installs and starts what the tests need, then
# runs formatting, lint, every test and a short fuzz pass. Works on a fresh
# Debian machine with a Rust toolchain; safe to run again.
#
# Needs: python3 (the audit tests read the ledger through Python's own
# http.server, a static file server we did not write); a real llama.cpp
# server with a real model (ops/model-server.sh installs it from PyPI; the
# agent tests start it); PostgreSQL (ops/postgres.sh starts it, or installs
# Debian's) and Kafka-protocol brokers (ops/broker.sh installs noida-db and
# tansu from PyPI; the cluster tests start their own, each test its own
# database and topics).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

apt_install() {
    # Root on CI machines; elsewhere, say what is missing instead of failing obscurely.
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing: $*; install it (Debian: apt-get install $*)" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

step "tools"
command -v python3 >/dev/null || apt_install python3
cargo --version
python3 --version
echo "model server venv: $(ops/model-server.sh venv)"
echo "postgres: $(ops/postgres.sh ensure)"
echo "kafka brokers: $(ops/broker.sh dir)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "alert rules (promtool check, unit tests)"
ops/promtool.sh

step "cargo test"
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$test_log"
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$test_log")

step "fuzz smoke (${FUZZ_SECONDS:-15} s per target)"
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" ops/fuzz.sh

# One closing line over every test binary (cargo prints one per binary, the
# last of which is often an empty doc-test run).
echo "tests: ${passed} passed, ${failed} failed"
