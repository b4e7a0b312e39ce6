#!/usr/bin/env bash
# Checks and unit-tests the Prometheus alert rules (ops/prometheus/alerts.yml,
# with the cases in alerts_test.yml) with Prometheus's own `promtool`. Uses
# the promtool on PATH, else unpacks the one in Debian's `prometheus` package
# into a cache folder (once; unpacked, not installed: no Prometheus service
# is set up or started).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${XDG_CACHE_HOME:-$HOME/.cache}/troop/prometheus"

promtool="$(command -v promtool || true)"
if [[ -z "$promtool" ]]; then
    promtool="$dir/usr/bin/promtool"
    if [[ ! -x "$promtool" ]]; then
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        # A fresh machine may have no package lists yet.
        (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null) ||
            { apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus); }
        mkdir -p "$dir"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
    fi
fi
"$promtool" --version 2>&1 | head -1
"$promtool" check rules ops/prometheus/alerts.yml
(cd ops/prometheus && "$promtool" test rules alerts_test.yml)
