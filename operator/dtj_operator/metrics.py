"""The operator's own Prometheus metrics (prometheus-client).

Served on DTJ_OPERATOR_METRICS_PORT when it is set (the chart sets it; a local
`dtj operator` leaves it off so several can run side by side). The workers'
training metrics are the trainer's (dtj_trainer.exporter), not these.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILE_SECONDS = Histogram(
    "dtj_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass of one job.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECONCILES = Counter(
    "dtj_operator_reconciles",
    "Reconcile passes by result: ok, or error (the pass raised; kopf retries it).",
    ["result"],
)
API_REQUESTS = Counter(
    "dtj_operator_api_requests",
    "Kubernetes API requests the reconciler made, by HTTP method (kopf's own watches "
    "and handler-progress patches are not included).",
    ["method"],
)
WORKERS_CREATED = Counter("dtj_operator_workers_created", "Worker pods created.")
COORDINATORS_REPLACED = Counter(
    "dtj_operator_coordinators_replaced",
    "Coordinator pods deleted for replacement after they ended (crash, OOM kill, eviction).",
)
WORKER_LOSSES = Counter(
    "dtj_operator_worker_losses",
    "Worker pods lost, by kind: preemption (deleted, drained, evicted, node lost) or "
    "failure (counted against backoffLimit).",
    ["kind"],
)
JOBS = Gauge("dtj_operator_jobs", "Jobs this operator reconciles, by phase.", ["phase"])
# Every label value is exported from the start, at 0: Prometheus's rate() and increase()
# cannot count the first increment of a series that appears already at 1.
for _kind in ("preemption", "failure"):
    WORKER_LOSSES.labels(kind=_kind)
for _result in ("ok", "error"):
    RECONCILES.labels(result=_result)

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def job_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone): moves one job between the
    per-phase series (constant work per pass, whatever the number of jobs)."""
    key = (namespace, name)
    with _lock:
        before = _phases.pop(key, None)
        if phase is not None:
            _phases[key] = phase
        if before == phase:
            return
        if before is not None:
            JOBS.labels(phase=before).dec()
        if phase is not None:
            JOBS.labels(phase=phase).inc()


def lost(counter: str, count: int = 1) -> None:
    """A worker loss counted in the job's status ("preemptions" or "failures")."""
    kind = {"preemptions": "preemption", "failures": "failure"}[counter]
    WORKER_LOSSES.labels(kind=kind).inc(count)


def serve_from_env() -> int | None:
    """Start the metrics endpoint if DTJ_OPERATOR_METRICS_PORT is set; return its port."""
    raw = os.environ.get("DTJ_OPERATOR_METRICS_PORT", "")
    if not raw:
        return None
    port = int(raw)
    start_http_server(port, addr=os.environ.get("DTJ_OPERATOR_METRICS_ADDR", "0.0.0.0"))
    return port
