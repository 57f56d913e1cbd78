"""kopf wiring: thin handlers that hand every event to `reconcile`.

Run with `kopf run -m dtj_operator.handlers` (what the operator image does).
The job is reconciled on each of its own events, on each event of a pod it
owns, and on a timer as a safety net, so missed events cannot leave it stale.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any

import kopf

from . import api, lifecycle, metrics, render
from .cluster import Cluster
from .reconcile import reconcile


@functools.cache
def _cluster() -> Cluster:
    return Cluster()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    # Handler progress lives in annotations: the CRD's structural schema would
    # prune kopf's usual status.kopf field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = 30  # WARNING and above become Kubernetes Events
    settings.watching.server_timeout = 120
    port = metrics.serve_from_env()
    if port is not None:
        logger.info("serving the operator's metrics on port %d (/metrics)", port)


_locks: collections.defaultdict[tuple[str, str], threading.Lock] = collections.defaultdict(
    threading.Lock
)


def reconcile_latest(namespace: str, name: str) -> None:
    """One pass at a time per job, each on a freshly read body.

    kopf runs handlers for the job and for each of its pods concurrently;
    serialising them per job and re-reading the job inside the lock means no
    pass acts on a status another pass has already changed.
    """
    with _locks[(namespace, name)]:
        job = _cluster().get_job(namespace, name)
        if job is None:
            metrics.job_phase(namespace, name, None)
            return
        with metrics.RECONCILE_SECONDS.time():
            try:
                new = reconcile(job, _cluster())
            except Exception:
                metrics.RECONCILES.labels(result="error").inc()
                raise
        metrics.RECONCILES.labels(result="ok").inc()
        phase = new.get("phase") or (job.get("status") or {}).get("phase") or "Pending"
        metrics.job_phase(namespace, name, phase)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def job_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
    if not namespace:
        return
    if type == "DELETED":
        metrics.job_phase(namespace, name, None)
    else:
        reconcile_latest(namespace, name)


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/managed-by": render.MANAGED_BY})
def pod_event(
    type: str, body: kopf.Body, namespace: str | None, logger: kopf.Logger, **_: Any
) -> None:
    job_name = body.get("metadata", {}).get("labels", {}).get(render.LABEL_JOB)
    if not job_name or not namespace:
        return
    if type == "DELETED" and body.get("metadata", {}).get("uid") not in _cluster().deleted_uids:
        with _locks[(namespace, job_name)]:
            job = _cluster().get_job(namespace, job_name)
            if job is None or job["metadata"].get("deletionTimestamp"):
                return
            if not render.owned_by(dict(body), job["metadata"].get("uid")):
                return  # a pod of an earlier job of the same name
            parsed = api.DecentralizedTrainingJob.from_body(job)
            counter = lifecycle.vanished_worker(parsed, dict(body), job.get("status") or {})
            logger.info("pod gone, counted as: %s", counter or "not a loss")
            if counter is not None:
                metrics.lost(counter)
            if counter == "preemptions":
                note = lifecycle.preemption_note(dict(body))
                _cluster().increment_status(namespace, job_name, counter, {"lastPreemption": note})
                _cluster().event(job, "Normal", "WorkerPreempted", f"{note}; replacing it")
            elif counter is not None:
                _cluster().increment_status(namespace, job_name, counter)
    reconcile_latest(namespace, job_name)


@kopf.on.event("", "v1", "nodes")
def node_event(type: str, body: kopf.Body, **_: Any) -> None:
    """Move workers off a node that announces its end, before it takes them down."""
    reason = lifecycle.disruption(dict(body)) if type != "DELETED" else None
    if reason is None:
        return
    cluster = _cluster()
    for pod in cluster.workers_on_node(body["metadata"]["name"], render.worker_selector_all()):
        meta = pod["metadata"]
        job_name = meta["labels"][render.LABEL_JOB]
        with _locks[(meta["namespace"], job_name)]:
            job = cluster.get_job(meta["namespace"], job_name)
            if job is None or not render.owned_by(pod, job["metadata"].get("uid")):
                continue  # its job is gone: the garbage collector removes the pod
            if cluster.delete_pod(meta["namespace"], meta["name"], meta["uid"]):
                note = lifecycle.preemption_note(dict(pod), f"moved away, {reason}")
                cluster.increment_status(
                    meta["namespace"], job_name, "preemptions", {"lastPreemption": note}
                )
                metrics.lost("preemptions")
                cluster.event(job, "Normal", "WorkerMoved", note)


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=10, idle=5)
def resync(name: str, namespace: str | None, **_: Any) -> None:
    if namespace:
        reconcile_latest(namespace, name)
