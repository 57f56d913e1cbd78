#!/usr/bin/env bash
# The pinned VictoriaMetrics single-node server, built once from its Go module
# (cached); prints the binary's path. It scrapes and answers PromQL: the dashboard
# test runs every query of the chart's Grafana dashboard against metrics scraped
# from real worker pods.
set -euo pipefail
VM_VERSION=v1.151.0
exec bash "$(dirname "$0")/../go-install.sh" victoria-metrics "$VM_VERSION" \
  github.com/VictoriaMetrics/VictoriaMetrics/app/victoria-metrics
