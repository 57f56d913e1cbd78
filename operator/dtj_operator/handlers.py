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
def pod_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    """Any change of a job's pod runs a pass of that job. Losses are counted there,
    from the pods' state (the tracking finalizer keeps an ended worker until then),
    never from this event: events can be missed, a pod's last state cannot."""
    pod = dict(body)
    meta = pod.get("metadata", {})
    job_name = meta.get("labels", {}).get(render.LABEL_JOB)
    if not job_name or not namespace:
        return
    if render.tracked(pod) and meta.get("deletionTimestamp"):
        job = _cluster().get_job(namespace, job_name)
        if job is None or not render.owned_by(pod, job["metadata"].get("uid")):
            # Its job is gone (the garbage collector is deleting it): let it go.
            _cluster().release(pod, render.TRACKING_FINALIZER)
            return
    reconcile_latest(namespace, job_name)


@kopf.on.event("", "v1", "nodes")
def node_event(type: str, body: kopf.Body, **_: Any) -> None:
    """Move workers off a node that announces its end, before it takes them down.
    The pass that sees them go counts them as preemptions, with this reason."""
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
            why = f"moved away, {reason}"
            cluster.annotate_pod(meta["namespace"], meta["name"], {render.ANNOTATION_MOVED: why})
            if cluster.delete_pod(meta["namespace"], meta["name"], meta["uid"]):
                cluster.event(job, "Normal", "WorkerMoved", lifecycle.preemption_note(pod, why))
        reconcile_latest(meta["namespace"], job_name)


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=10, idle=5)
def resync(name: str, namespace: str | None, **_: Any) -> None:
    if namespace:
        reconcile_latest(namespace, name)
