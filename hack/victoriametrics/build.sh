#!/usr/bin/env bash
# Build the pinned VictoriaMetrics single-node server once (from its Go module)
# and cache it under the user's cache directory, keyed by version. It scrapes and
# answers PromQL: the dashboard test runs every query of the chart's Grafana
# dashboard against metrics scraped from real worker pods. Prints the binary's path.
set -euo pipefail
VM_VERSION=v1.151.0
bin="${XDG_CACHE_HOME:-$HOME/.cache}/dtj/victoriametrics-${VM_VERSION}/bin"
if [ -x "$bin/victoria-metrics" ]; then echo "$bin/victoria-metrics"; exit 0; fi
command -v go >/dev/null || { echo "error: Go is needed to build VictoriaMetrics ${VM_VERSION}" >&2; exit 1; }
mkdir -p "$bin"
start=$(date +%s)
echo "Building VictoriaMetrics ${VM_VERSION} (once; cached in $bin)" >&2
tmp="$(mktemp -d "$bin.partial.XXXX")"
CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp" \
  go install -ldflags "-s -w" \
  "github.com/VictoriaMetrics/VictoriaMetrics/app/victoria-metrics@${VM_VERSION}"
mv "$tmp/victoria-metrics" "$bin/victoria-metrics"
rmdir "$tmp"
echo "VictoriaMetrics built in $(( $(date +%s) - start ))s" >&2
echo "$bin/victoria-metrics"
