"""One reconcile pass: observe -> sort -> desire -> act -> write status once.

Level-triggered and idempotent: every pass starts from what exists, so a
restarted operator (or two concurrent passes) converges to the same children
without duplicates; creation tolerates "already exists", deletion "not found".
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pydantic
from kubernetes.client.exceptions import ApiException

from . import api, lifecycle, metrics, render, status
from .cluster import Cluster

log = logging.getLogger(__name__)


def _invalid(body: dict[str, Any], err: pydantic.ValidationError) -> dict[str, Any]:
    """A Failed status that says which field to change (the CRD catches most of this first)."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = f"invalid spec: {where}: {first['msg']}"
    conds = status.set_condition(
        list((body.get("status") or {}).get("conditions") or []),
        "Failed",
        True,
        "InvalidSpec",
        message,
        body["metadata"].get("generation"),
    )
    return {"phase": "Failed", "conditions": conds}


def reconcile(body: dict[str, Any], cluster: Cluster) -> dict[str, Any]:
    """Bring one job's children in line with its spec; return the status written."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        # Going away with its pods: nothing left to count, nothing may hold them.
        for pod in cluster.list_pods(ns, f"{render.LABEL_JOB}={name}"):
            if render.owned_by(pod, meta.get("uid")):
                cluster.release(pod, render.TRACKING_FINALIZER)
        return {}
    try:
        job = api.DecentralizedTrainingJob.from_body(body)
    except pydantic.ValidationError as err:
        new = _invalid(body, err)
        if status.differs(body.get("status"), new):
            _write(cluster, body, new)
        return new

    # Observe and sort.
    old: dict[str, Any] = dict(body.get("status") or {})
    labelled = cluster.list_pods(ns, f"{render.LABEL_JOB}={name}")
    pods = [p for p in labelled if render.owned_by(p, meta.get("uid"))]
    leftovers = {p["metadata"]["name"] for p in labelled} - {p["metadata"]["name"] for p in pods}
    now = dt.datetime.now(dt.UTC)

    if old.get("phase") in lifecycle.TERMINAL:
        return _finished(job, body, pods, cluster, old, now)

    verdict = lifecycle.assess(job, pods, old, now)
    if verdict.reason == "BackoffLimitExceeded" and verdict.failed:
        return _fail_on_failures(job, body, pods, cluster, verdict)
    counted = _account(job, body, pods, cluster, verdict)
    if counted is None:
        return old  # the job changed meanwhile: its event runs the next pass
    for pod in verdict.failed + verdict.preempted:
        # Counted; the replacement comes on a later pass, once the old pod is gone.
        cluster.delete_pod(ns, pod["metadata"]["name"], pod["metadata"].get("uid"))
    if verdict.phase is not None:
        new = status.compute(
            job,
            body,
            pods,
            finished=(verdict.phase, verdict.reason, verdict.message),
        )
        _write(cluster, body, new)
        for pod_name in lifecycle.pods_to_clean(job, pods):
            cluster.delete_pod(ns, pod_name)
        return new
    gone = {p["metadata"]["name"] for p in verdict.failed + verdict.preempted}
    existing = {p["metadata"]["name"] for p in pods if not status.is_terminating(p)} | gone

    # Desire and act.
    desired = render.desired_children(job, body)
    wanted = {o["metadata"]["name"] for o in desired if o["kind"] == "Pod"}
    problems: list[str] = []
    for obj in desired:
        kind, child = obj["kind"], obj["metadata"]["name"]
        if kind == "Pod" and child in existing:
            continue
        if kind == "Pod" and child in leftovers:
            problems.append(
                f"pod {child} is left from an earlier job named {name}: waiting for it to "
                "go (delete it if it was orphaned)"
            )
            continue
        try:
            if cluster.create(obj):
                log.info("created %s %s/%s", kind, ns, child)
                if kind == "Pod" and obj["metadata"]["labels"].get(render.LABEL_COMPONENT) == (
                    render.WORKER
                ):
                    metrics.WORKERS_CREATED.inc()
            elif kind == "ConfigMap":
                _sync_config(cluster, obj)
        except ApiException as e:
            # Quota, admission or RBAC refusals: say so in the status and try
            # again on the next pass, instead of failing the handler.
            reason = e.reason or "error"
            problems.append(f"cannot create {kind} {child}: {reason} ({e.status})")
            log.warning("cannot create %s %s/%s: %s", kind, ns, child, e.reason)
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        unwanted = pod_name not in wanted and not status.is_terminating(pod)
        if unwanted and cluster.delete_pod(ns, pod_name, pod["metadata"].get("uid")):
            log.info("deleted pod %s/%s (no longer desired)", ns, pod_name)

    # Status, once.
    live = [p for p in pods if p["metadata"]["name"] not in gone]
    new = status.compute(job, body, live, problems=problems)
    present = {p["metadata"].get("uid") for p in pods}
    if sorted(counted & present) != sorted(old.get("countedPods") or []):
        new["countedPods"] = sorted(counted & present)  # settled uids drop out
    if status.differs(old, new):
        _write(cluster, body, new)
    return new


def _account(
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    cluster: Cluster,
    verdict: lifecycle.Assessment,
) -> set[str] | None:
    """Count every worker that ended, exactly once, then let its pod go.

    Lost workers are the failed ones (`verdict`) and the tracked pods being
    deleted that were never counted (deleted, drained, evicted, their node
    gone: the tracking finalizer held them however the operator missed their
    events). Their uids enter status.countedPods in the same write that
    increments the counters, guarded by the resourceVersion this pass read:
    a crash or a concurrent pass can neither skip nor repeat a count. Returns
    the counted uids, or None if the write lost a race (the next pass retries).
    """
    meta = body["metadata"]
    old: dict[str, Any] = dict(body.get("status") or {})
    counted = set(old.get("countedPods") or [])
    losses: dict[str, list[dict[str, Any]]] = {
        "failures": list(verdict.failed),
        "preemptions": list(verdict.preempted),
    }
    settled: list[dict[str, Any]] = []  # deleting and tracked: release once counted
    for pod in pods:
        if not (render.tracked(pod) and status.is_terminating(pod)):
            continue
        settled.append(pod)
        if pod["metadata"].get("uid") not in counted:
            counter = lifecycle.vanished_worker(job, pod, old)
            if counter is not None:
                losses[counter].append(pod)
    new_uids = {p["metadata"]["uid"] for lost in losses.values() for p in lost}
    if new_uids:
        patch: dict[str, Any] = {"countedPods": sorted(counted | new_uids)}
        for counter, lost in losses.items():
            if lost:
                patch[counter] = int(old.get(counter) or 0) + len(lost)
        if losses["failures"]:
            patch["lastFailure"] = lifecycle.failure_note(losses["failures"][-1])
        if losses["preemptions"]:
            patch["lastPreemption"] = lifecycle.preemption_note(losses["preemptions"][-1])
        try:
            cluster.patch_status(
                meta["namespace"], meta["name"], patch, resource_version=meta["resourceVersion"]
            )
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        counted |= new_uids
        for counter, lost in losses.items():
            metrics.lost(counter, len(lost))
            for pod in lost:
                if counter == "failures":
                    note = lifecycle.failure_note(pod)
                    cluster.warn(body, "WorkerFailed", note)
                else:
                    note = lifecycle.preemption_note(pod)
                    cluster.event(body, "Normal", "WorkerPreempted", f"{note}; replacing it")
                log.info("worker %s/%s lost (%s)", meta["namespace"], pod["metadata"]["name"], note)
    for pod in settled:
        cluster.release(pod, render.TRACKING_FINALIZER)
    return counted


def _fail_on_failures(
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    cluster: Cluster,
    verdict: lifecycle.Assessment,
) -> dict[str, Any]:
    """The failures that end the job: kept (so `kubectl logs` still shows why) and
    counted in the same write that ends the job, guarded by the resourceVersion
    this pass read, so they are counted exactly once or the pass runs again."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    new = status.compute(
        job, body, pods, finished=(verdict.phase or "Failed", verdict.reason, verdict.message)
    )
    old = body.get("status") or {}
    new["failures"] = int(old.get("failures") or 0) + len(verdict.failed)
    new["lastFailure"] = lifecycle.failure_note(verdict.failed[-1])
    uids = {p["metadata"]["uid"] for p in verdict.failed}
    new["countedPods"] = sorted(set(old.get("countedPods") or []) | uids)
    _write(cluster, body, new, resource_version=meta["resourceVersion"])
    metrics.lost("failures", len(verdict.failed))
    for pod in verdict.failed:
        cluster.warn(body, "WorkerFailed", lifecycle.failure_note(pod))
    log.info("job %s/%s failed: %s", ns, name, verdict.message)
    for pod_name in lifecycle.pods_to_clean(job, pods):
        cluster.delete_pod(ns, pod_name)
    return new


def _finished(
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    cluster: Cluster,
    old: dict[str, Any],
    now: dt.datetime,
) -> dict[str, Any]:
    """A finished job: keep its pods cleaned up and honour ttlSecondsAfterFinished."""
    meta = body["metadata"]
    for pod_name in lifecycle.pods_to_clean(job, pods):
        cluster.delete_pod(meta["namespace"], pod_name)
    for pod in pods:  # a finished job counts no more losses
        if status.is_terminating(pod):
            cluster.release(pod, render.TRACKING_FINALIZER)
    if lifecycle.ttl_expired(job, old, now):
        log.info(
            "deleting finished job %s/%s (ttlSecondsAfterFinished)", meta["namespace"], meta["name"]
        )
        cluster.delete_job(meta["namespace"], meta["name"])
    return old


def _write(cluster: Cluster, body: dict[str, Any], new: dict[str, Any], **kwargs: Any) -> None:
    """Write the status, and tell the story in Events (`kubectl describe dtj`)."""
    meta = body["metadata"]
    cluster.patch_status(meta["namespace"], meta["name"], new, **kwargs)
    for kind, reason, message in status.transitions(body.get("status") or {}, new):
        cluster.event(body, kind, reason, message)


def _sync_config(cluster: Cluster, desired: dict[str, Any]) -> None:
    """Update the trainer config when the spec changed (e.g. replicas after a scale)."""
    meta = desired["metadata"]
    current = cluster.read_config_map(meta["namespace"], meta["name"])
    if current is not None and current.get("data") != desired["data"]:
        cluster.patch_config_map(meta["namespace"], meta["name"], desired["data"])
