"""kopf wiring: thin handlers that hand every event to `reconcile`.

Run with `kopf run -m dtj_operator.handlers` (what the operator image does).
The job is reconciled on each of its own events, on each event of a pod it
owns, and on a timer as a safety net, so missed events cannot leave it stale.
"""

from __future__ import annotations

import functools
from typing import Any

import kopf

from . import api, lifecycle, render
from .cluster import Cluster
from .reconcile import reconcile


@functools.cache
def _cluster() -> Cluster:
    return Cluster()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress lives in annotations: the CRD's structural schema would
    # prune kopf's usual status.kopf field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = 30  # WARNING and above become Kubernetes Events
    settings.watching.server_timeout = 120


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def job_event(type: str, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        return
    reconcile(dict(body), _cluster())


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/managed-by": render.MANAGED_BY})
def pod_event(type: str, body: kopf.Body, **_: Any) -> None:
    job_name = body.get("metadata", {}).get("labels", {}).get(render.LABEL_JOB)
    ns = body.get("metadata", {}).get("namespace")
    if not job_name or not ns:
        return
    job = _cluster().get_job(ns, job_name)
    if job is None:
        return
    if type == "DELETED":
        parsed = api.DecentralizedTrainingJob.from_body(job)
        if lifecycle.involuntary_loss(parsed, dict(body), job.get("status") or {}):
            _cluster().increment_status(ns, job_name, "preemptions")
            job = _cluster().get_job(ns, job_name) or job
    reconcile(job, _cluster())


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=10, idle=5)
def resync(body: kopf.Body, **_: Any) -> None:
    reconcile(dict(body), _cluster())
