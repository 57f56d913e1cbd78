"""Pure functions from observed pods to the job's status.

Reconcile calls `compute` once per pass and writes the result once. Conditions
keep their lastTransitionTime unless their status actually changes, so a
status write is a no-op when nothing happened.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import api, render


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_ready(pod: dict[str, Any]) -> bool:
    if (pod.get("status") or {}).get("phase") != "Running":
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def is_terminating(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def workers(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in pods
        if p["metadata"].get("labels", {}).get(render.LABEL_COMPONENT) == render.WORKER
        and not is_terminating(p)
    ]


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A new condition list with `type_` set; lastTransitionTime moves only on a change."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    cond = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now() if changed or old is None else old["lastTransitionTime"],
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return [c for c in conditions if c.get("type") != type_] + [cond]


def degradation(
    old: dict[str, Any], running: bool, present: int, desired: int, needed: int = 0
) -> tuple[bool, str, str]:
    """Whether the job trains short-handed, and why: the Degraded condition.

    Training paused below minReplicas (as the coordinator reports) comes first;
    otherwise missing workers, with the last one the platform took."""
    prog = old.get("progress") or {}
    if running and prog.get("paused"):
        return (
            True,
            "TrainingPaused",
            f"training paused: {prog.get('members', 0)} live workers, fewer than minReplicas; "
            "it resumes when replacements join",
        )
    if running and present < desired:
        msg = f"{present}/{desired} workers ready; training continues"
        if present < needed:
            msg = (
                f"{present}/{desired} workers ready, fewer than minReplicas {needed}; "
                "training waits for replacements"
            )
        if old.get("lastPreemption"):
            msg += f" (last lost: {old['lastPreemption']})"
        return True, "WorkersMissing", msg
    return False, "AllWorkersReady", ""


def compute(
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    *,
    finished: tuple[str, str, str] | None = None,
    problems: list[str] | None = None,
) -> dict[str, Any]:
    """The status the job should show for the observed `pods`.

    `finished` is (phase, reason, message) when the run policy ended the job.
    The preemption and failure counters are not part of it: they are only
    ever incremented, with a resourceVersion guard (reconcile._account),
    so a pass working from a stale body cannot write an old count back.
    """
    old: dict[str, Any] = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    live = workers(pods)
    ready = sum(1 for p in live if is_ready(p))
    pending = sum(1 for p in live if (p.get("status") or {}).get("phase", "Pending") == "Pending")
    desired = job.spec.replicas
    needed = job.spec.min_replicas or desired
    conds: list[dict[str, Any]] = list(old.get("conditions") or [])
    if problems:
        conds = set_condition(
            conds, "Created", False, "CreateFailed", "; ".join(problems)[:1000], generation
        )
    else:
        conds = set_condition(
            conds,
            "Created",
            True,
            "ChildrenCreated",
            "Service, config and pods created",
            generation,
        )
    suspended = job.spec.run_policy.suspend
    # Workers that finished their steps are done, not missing: the job keeps
    # Running while the others finish.
    done = sum(1 for p in live if (p.get("status") or {}).get("phase") == "Succeeded")
    running = ready > 0 and ready + done >= needed and not suspended and finished is None
    # Once started, a job short of minReplicas is Running and Degraded (training waits
    # for replacements), not back to Pending: what users and autoscalers watch.
    active = running or (bool(old.get("startTime")) and not suspended and finished is None)
    if finished is not None:
        phase, reason, msg = finished
        conds = set_condition(conds, phase, True, reason, msg, generation)
    elif suspended:
        phase, msg = "Suspended", "spec.runPolicy.suspend is true; workers deleted"
    elif active:
        phase, msg = "Running", f"{ready}/{desired} workers ready (training needs {needed})"
    else:
        phase = "Pending"
        msg = (
            f"{ready}/{desired} workers ready, {pending} waiting for a node; "
            f"training needs {needed}"
        )
    if finished is not None:
        running_reason = finished[1]
    elif running:
        running_reason = "WorkersReady"
    else:
        running_reason = "Suspended" if suspended else "WaitingForWorkers"
    conds = set_condition(conds, "Running", running, running_reason, msg, generation)
    conds = set_condition(
        conds, "Degraded", *degradation(old, active, ready + done, desired, needed), generation
    )
    conds = set_condition(
        conds,
        "Suspended",
        suspended,
        "Suspended" if suspended else "NotSuspended",
        msg if suspended else "",
        generation,
    )
    conds = set_condition(conds, "Reconciled", True, "Reconciled", "", generation)
    status = {
        "phase": phase,
        "conditions": conds,
        "observedGeneration": generation,
        "replicas": len(live),
        "readyReplicas": ready,
        "pendingReplicas": pending,
        "selector": render.worker_selector(job.name),
    }
    if running and not old.get("startTime"):
        status["startTime"] = now()
    elif suspended and finished is None and old.get("startTime"):
        status["startTime"] = None
    # The deadline's clock: from the first pass (a job stuck Pending times out too) or
    # the last resume, as a batch Job's startTime. A job an older operator started
    # keeps the clock it had.
    if not suspended and finished is None and not old.get("activeSince"):
        status["activeSince"] = old.get("startTime") or now()
    elif suspended and finished is None and old.get("activeSince"):
        status["activeSince"] = None  # the deadline restarts on resume
    if finished is not None and not old.get("completionTime"):
        status["completionTime"] = now()
    return status


def failed_pass(body: dict[str, Any], message: str) -> dict[str, Any]:
    """The status patch of a pass that raised: Reconciled turns False saying why, so
    `kubectl get dtj -o yaml` (and whatever waits on conditions) sees the job stand
    still; the next pass that succeeds turns it True again."""
    old = body.get("status") or {}
    conds = set_condition(
        list(old.get("conditions") or []),
        "Reconciled",
        False,
        "ReconcileFailed",
        message,
        body["metadata"].get("generation"),
    )
    return {"conditions": conds}


def differs(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing `new` would change anything."""
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())


def transitions(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The Events a status change deserves, as (type, reason, message): the job's
    phase moving (Running, Suspended, Succeeded, Failed) and Degraded turning True."""

    def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
        return next((c for c in st.get("conditions") or [] if c.get("type") == type_), {})

    out: list[tuple[str, str, str]] = []
    phase = new.get("phase")
    if phase and phase != old.get("phase") and phase != "Pending":
        # The condition that explains the phase (Running's also explains a resume).
        c = cond(new, phase if phase in ("Succeeded", "Failed", "Suspended") else "Running")
        kind = "Warning" if phase == "Failed" else "Normal"
        reason = phase if phase != "Failed" else c.get("reason") or "Failed"
        out.append((kind, reason, c.get("message") or phase))
    degraded = cond(new, "Degraded")
    if degraded.get("status") == "True" and cond(old, "Degraded").get("status") != "True":
        out.append(("Warning", "Degraded", degraded.get("message") or "short of workers"))
    return out
