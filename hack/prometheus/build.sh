#!/usr/bin/env bash
# The pinned Prometheus server, built once from its Go module (cached); prints the
# binary's path. The dashboard test and bench/dashboard.py scrape real workers and
# the operator with it and run every query of the chart's Grafana dashboard.
# Module v0.316.0 is Prometheus 3.16.0 (v0.3XX.Y <-> v3.XX.Y). Built without the
# cloud service-discovery plugins (build tag remove_all_sd; the tests use static
# targets): 1 min 49 s to compile cold here, with the modules already downloaded.
set -euo pipefail
PROMETHEUS_MODULE_VERSION=v0.316.0
GO_TAGS=remove_all_sd exec bash "$(dirname "$0")/../go-install.sh" prometheus "$PROMETHEUS_MODULE_VERSION" \
  github.com/prometheus/prometheus/cmd/prometheus \
  "-X github.com/prometheus/common/version.Version=3.16.0"
