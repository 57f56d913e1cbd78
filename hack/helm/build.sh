#!/usr/bin/env bash
# The pinned helm, built once from its Go module (cached); prints the binary's path.
set -euo pipefail
HELM_VERSION=v3.22.0
exec bash "$(dirname "$0")/../go-install.sh" helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
