"""One reconcile pass: observe -> sort -> desire -> act -> write status once.

Level-triggered and idempotent: every pass starts from what exists, so a
restarted operator (or two concurrent passes) converges to the same children
without duplicates; creation tolerates "already exists", deletion "not found".
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic

from . import api, render, status
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
        return {}
    try:
        job = api.DecentralizedTrainingJob.from_body(body)
    except pydantic.ValidationError as err:
        new = _invalid(body, err)
        if status.differs(body.get("status"), new):
            cluster.patch_status(ns, name, new)
        return new

    # Observe and sort.
    pods = cluster.list_pods(ns, f"{render.LABEL_JOB}={name}")
    existing = {p["metadata"]["name"] for p in pods if not status.is_terminating(p)}

    # Desire and act.
    desired = render.desired_children(job, body)
    wanted = {o["metadata"]["name"] for o in desired if o["kind"] == "Pod"}
    for obj in desired:
        kind, child = obj["kind"], obj["metadata"]["name"]
        if kind == "Pod" and child in existing:
            continue
        if cluster.create(obj):
            log.info("created %s %s/%s", kind, ns, child)
        elif kind == "ConfigMap":
            _sync_config(cluster, obj)
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        unwanted = pod_name not in wanted and not status.is_terminating(pod)
        if unwanted and cluster.delete_pod(ns, pod_name):
            log.info("deleted pod %s/%s (no longer desired)", ns, pod_name)

    # Status, once.
    new = status.compute(job, body, pods)
    if status.differs(body.get("status"), new):
        cluster.patch_status(ns, name, new)
    return new


def _sync_config(cluster: Cluster, desired: dict[str, Any]) -> None:
    """Update the trainer config when the spec changed (e.g. replicas after a scale)."""
    meta = desired["metadata"]
    current = cluster.read_config_map(meta["namespace"], meta["name"])
    if current is not None and current.get("data") != desired["data"]:
        cluster.patch_config_map(meta["namespace"], meta["name"], desired["data"])
