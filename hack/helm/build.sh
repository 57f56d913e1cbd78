#!/usr/bin/env bash
# Build the pinned helm once (from its Go module) and cache it under the user's
# cache directory, keyed by version. Prints the binary's path.
set -euo pipefail
HELM_VERSION=v3.22.0
bin="${XDG_CACHE_HOME:-$HOME/.cache}/dtj/helm-${HELM_VERSION}/bin"
if [ -x "$bin/helm" ]; then echo "$bin/helm"; exit 0; fi
command -v go >/dev/null || { echo "error: Go is needed to build helm ${HELM_VERSION}" >&2; exit 1; }
mkdir -p "$bin"
start=$(date +%s)
echo "Building helm ${HELM_VERSION} (once; cached in $bin)" >&2
tmp="$(mktemp -d "$bin.partial.XXXX")"
CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp" \
  go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
  "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
mv "$tmp/helm" "$bin/helm"
rmdir "$tmp"
echo "helm built in $(( $(date +%s) - start ))s" >&2
echo "$bin/helm"
