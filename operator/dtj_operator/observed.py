"""What the operator keeps of the objects it watches: only what a pass reads.

The watch cache holds these projections, not whole objects: a thousand jobs
of nine pods fit in a few MiB, and an event whose projection did not change
(a kubelet heartbeat, a probe time) runs no pass at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

_POD_META = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def pod(body: dict[str, Any]) -> dict[str, Any]:
    """A pod as reconcile, status and lifecycle read it."""
    meta = body.get("metadata") or {}
    st = body.get("status") or {}
    statuses: list[dict[str, Any]] = []
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term is None:
            statuses.append({"state": {}})
            continue
        keep = {k: term[k] for k in ("exitCode", "message", "finishedAt") if k in term}
        statuses.append({"state": {"terminated": keep}})
    status = {
        "phase": st.get("phase"),
        "reason": st.get("reason"),
        "message": st.get("message"),
        "conditions": [
            {k: c[k] for k in ("type", "status", "reason") if k in c}
            for c in st.get("conditions") or []
        ],
        "containerStatuses": statuses,
    }
    return {
        "metadata": {k: meta[k] for k in _POD_META if meta.get(k) is not None},
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": status,
    }


# On a child whose spec the operator keeps up to date (the NetworkPolicy): the digest of
# the spec it last wrote, so a changed desired spec (the chart's metricsFrom) is applied.
SPEC_DIGEST = "training.dtj.io/spec-digest"


def child(body: dict[str, Any]) -> dict[str, Any]:
    """A Service, ConfigMap, ServiceAccount, Role or RoleBinding: who owns it and,
    for the ConfigMap, a digest of its data (to update the config after a scale)."""
    meta = body.get("metadata") or {}
    return {
        "kind": body.get("kind"),
        "name": meta.get("name"),
        "owners": [r.get("uid") for r in meta.get("ownerReferences") or []],
        "digest": digest(body.get("data")),
        "applied": (meta.get("annotations") or {}).get(SPEC_DIGEST),
    }


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def job(body: dict[str, Any]) -> dict[str, Any]:
    """A job minus what no pass reads: the trainer's progress report (except whether
    training is paused and how many members it has) and bookkeeping metadata."""
    meta = body.get("metadata") or {}
    st = dict(body.get("status") or {})
    prog = st.pop("progress", None) or {}
    return {
        "metadata": {k: meta.get(k) for k in ("uid", "generation", "deletionTimestamp")},
        "spec": body.get("spec"),
        "status": st | {"progress": {k: prog.get(k) for k in ("paused", "members")}},
    }


@dataclass
class Observed:
    """One job as the cache shows it, plus what this operator did that the cache
    has not shown yet (client-go's "expectations"): pods it created and pods it
    deleted, so a pass working from a lagging cache neither creates twice nor
    deletes twice."""

    body: dict[str, Any]
    pods: list[dict[str, Any]]
    children: list[dict[str, Any]]
    created: set[str] = field(default_factory=set)  # pod names created, not yet seen
    deleting: set[str] = field(default_factory=set)  # pod uids deleted, not yet seen going
    seen_version: str = ""  # the job's resourceVersion in the cache
    refusals: int = 0  # passes in a row whose pod creates were refused (quota, webhook)
    create_backoff: float = 0.0  # seconds until pod creates may be tried again
