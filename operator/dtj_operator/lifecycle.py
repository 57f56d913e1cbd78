"""Run-policy decisions as pure functions: failure vs preemption, budgets, deadlines.

A worker lost to the platform (evicted, preempted, its node drained or gone)
is a preemption: it is replaced and never spends the failure budget. A
worker whose container failed on its own is a failure and counts toward
`backoffLimit`. Kubeflow's PyTorchJob counts both the same way, which is
what makes spot capacity expensive there.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from . import api, render, status

PREEMPTION_REASONS = frozenset(
    {"Evicted", "Preempting", "Preempted", "NodeLost", "NodeShutdown", "Shutdown", "Terminated"}
)
TERMINAL = ("Succeeded", "Failed")
# The kubelet refused the pod at admission (no free GPU on the node after all, a
# device plugin error, a node label that changed): the node's doing, not the
# worker's, so it is replaced without spending backoffLimit.
ADMISSION_REASONS = frozenset({"UnexpectedAdmissionError", "NodeAffinity"})


def rejected_by_node(pod: dict[str, Any]) -> bool:
    reason = str((pod.get("status") or {}).get("reason") or "")
    return reason in ADMISSION_REASONS or reason.startswith("OutOf")


# Taints that announce a node is about to go away: its workers leave at once (a
# graceful hand-off) instead of dying with it. Listed in the README.
DISRUPTION_TAINTS = {
    "node.kubernetes.io/unschedulable": "cordoned",
    "ToBeDeletedByClusterAutoscaler": "being removed by the cluster autoscaler",
    "karpenter.sh/disrupted": "being disrupted by Karpenter",
    "karpenter.sh/disruption": "being disrupted by Karpenter",
    "cloud.google.com/impending-node-termination": "about to be terminated (GKE)",
    "aws-node-termination-handler/spot-itn": "about to be reclaimed (AWS spot interruption)",
    "aws-node-termination-handler/scheduled-maintenance": "scheduled for maintenance (AWS)",
    "dtj.io/impending-termination": "marked for termination",
}


# ... of which these give minutes or seconds: every worker leaves at once (the node goes
# whatever a disruption budget says). For the others (a drain, a scale-down) workers
# are evicted a few at a time (`may_move`), through the Eviction API.
URGENT_TAINTS = frozenset(
    {
        "cloud.google.com/impending-node-termination",
        "aws-node-termination-handler/spot-itn",
        "dtj.io/impending-termination",
    }
)


def urgent(node: dict[str, Any]) -> bool:
    """Whether `node` is about to vanish within minutes (no time for a budget)."""
    taints = (node.get("spec") or {}).get("taints") or []
    return any(t.get("key") in URGENT_TAINTS for t in taints)


def may_move(job: api.DecentralizedTrainingJob, pods: list[dict[str, Any]]) -> int:
    """How many more of the job's workers may leave a disrupted node now: the job's
    own disruption budget, as a PodDisruptionBudget's maxUnavailable of
    replicas - minReplicas (one at least, so that a drain ends). Workers not ready
    (moving, their replacements starting) use it up."""
    live = status.workers(pods)
    ready = sum(1 for p in live if status.is_ready(p))
    needed = job.spec.min_replicas or job.spec.replicas
    allowed = max(1, job.spec.replicas - needed)
    return max(0, allowed - (job.spec.replicas - ready))


def disruption(node: dict[str, Any]) -> str | None:
    """Why `node` is about to go away, if it says so (a taint above, or cordoned)."""
    spec = node.get("spec") or {}
    for taint in spec.get("taints") or []:
        if taint.get("key") in DISRUPTION_TAINTS:
            return f"node {node['metadata']['name']} is {DISRUPTION_TAINTS[taint['key']]}"
    if spec.get("unschedulable"):
        return f"node {node['metadata']['name']} is cordoned"
    return None


def is_preempted(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("reason") in PREEMPTION_REASONS or rejected_by_node(pod):
        return True
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in st.get("conditions") or []
    )


# Why the platform took a pod (its DisruptionTarget condition's reason), for users.
DISRUPTION_REASONS = {
    "PreemptionByScheduler": "preempted by a higher-priority pod",
    "DeletionByTaintManager": "evicted from a tainted node",
    "EvictionByEvictionAPI": "evicted (a drain or the eviction API)",
    "DeletionByPodGC": "lost with its node",
    "TerminationByKubelet": "stopped by its node (shutdown or resource pressure)",
}


def preemption_note(pod: dict[str, Any], why: str | None = None) -> str:
    """A lost worker in a sentence: its name and why the platform took it."""
    name = pod["metadata"]["name"]
    why = why or (pod["metadata"].get("annotations") or {}).get(render.ANNOTATION_MOVED)
    if why:
        return f"{name}: {why}"
    st = pod.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            reason = DISRUPTION_REASONS.get(c.get("reason", ""), c.get("reason") or "disrupted")
            return f"{name}: {reason}"
    if st.get("reason") in PREEMPTION_REASONS:
        return f"{name}: {st['reason'].lower()}" + (
            f" ({st['message'][:300]})" if st.get("message") else ""
        )
    if rejected_by_node(pod):
        return f"{name}: rejected by its node ({st['reason']}: {str(st.get('message'))[:300]})"
    return f"{name}: deleted"


def exit_code(pod: dict[str, Any]) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term is not None:
            return int(term.get("exitCode", 0))
    return None


def failure_note(pod: dict[str, Any]) -> str:
    """A failed worker in a sentence: its name, exit code and the last line it logged
    (its termination message, which FallbackToLogsOnError fills from the log)."""
    note = f"{pod['metadata']['name']} exited with code {exit_code(pod)}"
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        message = ((cs.get("state") or {}).get("terminated") or {}).get("message") or ""
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        if lines:
            return f"{note}: {lines[-1][:500]}"
    return note


@dataclass
class Assessment:
    """What this pass must do about finished workers, and whether the job is over."""

    failed: list[dict[str, Any]] = field(default_factory=list)
    preempted: list[dict[str, Any]] = field(default_factory=list)
    phase: str | None = None  # Succeeded or Failed when the job is over
    reason: str = ""
    message: str = ""


def parse_time(value: str) -> dt.datetime:
    """An API timestamp, as the server writes it (...Z) or as the client's
    sanitize_for_serialization does (...+00:00)."""
    when = dt.datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def assess(
    job: api.DecentralizedTrainingJob,
    pods: list[dict[str, Any]],
    old_status: dict[str, Any],
    now: dt.datetime,
) -> Assessment:
    a = Assessment()
    live = status.workers(pods)
    counted = set(old_status.get("countedPods") or [])
    for p in live:
        phase = (p.get("status") or {}).get("phase")
        if phase == "Failed" and p["metadata"].get("uid") not in counted:
            (a.preempted if is_preempted(p) else a.failed).append(p)
    policy = job.spec.run_policy
    failures = int(old_status.get("failures") or 0) + len(a.failed)
    if failures > policy.backoff_limit:
        if a.failed:
            last = failure_note(a.failed[-1])
        else:
            last = old_status.get("lastFailure") or "unknown"
        a.phase, a.reason = "Failed", "BackoffLimitExceeded"
        a.message = (
            f"{failures} worker failures exceed backoffLimit {policy.backoff_limit}; "
            f"last: {last} (preemptions are not counted)"
        )
        return a
    start = old_status.get("activeSince") or old_status.get("startTime")
    if policy.active_deadline_seconds and start and not policy.suspend:
        elapsed = (now - parse_time(start)).total_seconds()
        if elapsed > policy.active_deadline_seconds:
            a.phase, a.reason = "Failed", "DeadlineExceeded"
            a.message = (
                f"ran {elapsed:.0f}s, longer than activeDeadlineSeconds "
                f"{policy.active_deadline_seconds}"
            )
            return a
    done = [p for p in live if (p.get("status") or {}).get("phase") == "Succeeded"]
    if len(done) >= job.spec.replicas:
        a.phase, a.reason = "Succeeded", "AllWorkersSucceeded"
        a.message = f"all {len(done)} workers finished training"
    return a


def pods_to_clean(
    job: api.DecentralizedTrainingJob, pods: list[dict[str, Any]], *, failed: bool = False
) -> list[str]:
    """Pods to delete once the job is over, per cleanPodPolicy. A job that failed (its
    deadline, its backoff limit) stops what still runs whatever the policy, as batch/v1
    Jobs do: None keeps the pods that ended, for their logs."""
    policy = job.spec.run_policy.clean_pod_policy
    if policy == "None":
        return still_running(pods) if failed else []
    if policy == "All":
        return [p["metadata"]["name"] for p in pods if not status.is_terminating(p)]
    return still_running(pods)


def still_running(pods: list[dict[str, Any]]) -> list[str]:
    """The pods that are running or about to (not being deleted)."""
    return [
        p["metadata"]["name"]
        for p in pods
        if not status.is_terminating(p)
        and (p.get("status") or {}).get("phase") in ("Running", "Pending")
    ]


def ttl_left(
    job: api.DecentralizedTrainingJob, old_status: dict[str, Any], now: dt.datetime
) -> float | None:
    """Seconds until a finished job is deleted (ttlSecondsAfterFinished), or None."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done = old_status.get("completionTime")
    if ttl is None or done is None:
        return None
    return ttl - (now - parse_time(done)).total_seconds()


def deadline_in(
    job: api.DecentralizedTrainingJob, new_status: dict[str, Any], now: dt.datetime
) -> float | None:
    """Seconds until activeDeadlineSeconds runs out (a pass must then look), or None
    when no deadline runs (none set, suspended)."""
    policy = job.spec.run_policy
    start = new_status.get("activeSince")
    if not policy.active_deadline_seconds or not start or policy.suspend:
        return None
    elapsed = (now - parse_time(start)).total_seconds()
    return max(policy.active_deadline_seconds - elapsed, 0.0) + 0.5


def vanished_worker(
    job: api.DecentralizedTrainingJob, pod: dict[str, Any], old_status: dict[str, Any]
) -> str | None:
    """Which counter a worker pod that vanished without the operator deleting it
    belongs to: "preemptions" (deleted, drained, evicted, its node gone: the pod
    garbage collector fails such pods with a DisruptionTarget condition before
    removing them; whatever its exit code once its deletion stopped it),
    "failures" (it had failed on its own before), or None (not a loss: it had
    finished, the job is suspended or finished, or the slot is no longer wanted).
    """
    labels = pod["metadata"].get("labels") or {}
    if labels.get(render.LABEL_COMPONENT) != render.WORKER:
        return None
    if job.spec.run_policy.suspend or old_status.get("phase") in TERMINAL:
        return None
    if render.ANNOTATION_RELEASED in (pod["metadata"].get("annotations") or {}):
        return None  # the operator removed it (suspended, scaled away) before a resume
    if int(labels.get(render.LABEL_SLOT, "0")) >= job.spec.replicas:
        return None
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed") and not stopped_by_deletion(pod):
        if phase == "Succeeded":
            return None
        return "preemptions" if is_preempted(pod) else "failures"
    return "preemptions"


def stopped_by_deletion(pod: dict[str, Any]) -> bool:
    """Whether the worker's containers ended after its deletion was requested: a worker
    that hands off and exits 0 on SIGTERM (or is killed at the end of its grace
    period) was stopped by whoever deleted it, not finished or failed on its own."""
    meta = pod["metadata"]
    when = meta.get("deletionTimestamp")
    if not when:
        return False
    grace = int(meta.get("deletionGracePeriodSeconds") or 0)
    requested = parse_time(when) - dt.timedelta(seconds=grace + 1)  # 1 s: timestamp rounding
    ends = [
        parse_time(term["finishedAt"])
        for cs in (pod.get("status") or {}).get("containerStatuses") or []
        if (term := (cs.get("state") or {}).get("terminated")) and term.get("finishedAt")
    ]
    return not ends or max(ends) >= requested
