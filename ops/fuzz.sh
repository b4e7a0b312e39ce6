#!/usr/bin/env bash
# Runs each cargo-fuzz target of the ledger for FUZZ_SECONDS (default 60),
# seeded with the golden fixtures. cargo-fuzz needs nightly compiler flags:
# the nightly toolchain if the machine has one, else the stable one with
# RUSTC_BOOTSTRAP=1 (the sanitizer runtime ships with stable on x86_64 Linux).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-entry note proof bundle}"

if ! command -v cargo-fuzz >/dev/null; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi

if rustup run nightly rustc --version >/dev/null 2>&1; then
    fuzz() { (cd "$root/ledger" && cargo +nightly fuzz "$@"); }
else
    fuzz() { (cd "$root/ledger" && RUSTC_BOOTSTRAP=1 cargo fuzz "$@"); }
fi

# Corpora live outside the clone: they are cache, not source.
corpus_root="${FUZZ_CORPUS_DIR:-${CARGO_TARGET_DIR:-$root/target}/fuzz-corpus}"
for t in $targets; do
    corpus="$corpus_root/$t"
    mkdir -p "$corpus"
    if [ "$t" = entry ]; then cp "$root"/schemas/fixtures/v1/*.json "$corpus/"; fi
    echo "fuzz $t for ${secs}s" >&2
    log="$corpus_root/$t.log"
    if ! fuzz run "$t" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=70000 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz $t FAILED (artifacts under ledger/fuzz/artifacts/$t)" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log" >&2 || true
done
echo "fuzz: $targets ran ${secs}s each without a crash"
