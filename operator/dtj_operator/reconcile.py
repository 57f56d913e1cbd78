"""One reconcile pass: observe -> sort -> desire -> act -> write status once.

Level-triggered and idempotent: every pass starts from what the watch cache
shows (`observed.Observed`), creates only what is missing and writes the
status only when it changed, so a steady job costs no API request. A lagging
cache costs at most a refused request: creation tolerates "already exists",
deletion "not found", counted losses are written with a resourceVersion guard.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pydantic
from kubernetes.client.exceptions import ApiException

from . import api, lifecycle, metrics, render, status
from .cluster import Cluster
from .observed import SPEC_DIGEST, Observed, digest

log = logging.getLogger(__name__)

# Retry a refused create (quota, admission) this much later, doubling with each pass
# refused in a row up to MAX_RETRY_SECONDS: one POST per wait, not one per missing pod.
RETRY_SECONDS, MAX_RETRY_SECONDS = 10.0, 300.0


def create_backoff(refusals: int) -> float:
    """How long pod creates wait after `refusals` refused passes in a row."""
    return 0.0 if refusals <= 0 else min(RETRY_SECONDS * 2 ** (refusals - 1), MAX_RETRY_SECONDS)


# Namespaces whose pods may scrape the workers' metrics port past the job's
# NetworkPolicy (the chart's networkPolicy.metricsFrom; "" lets none).
METRICS_FROM = render.equality_selector(
    os.environ.get("DTJ_METRICS_FROM", "kubernetes.io/metadata.name=monitoring")
)
# How long a create or delete may take to show in the cache before a pass looks again.
EXPECTATION_SECONDS = 30.0
RACE_SECONDS = 1.0  # a count that lost a write race is tried again this soon


@dataclass
class Pass:
    """What a pass did that the cache has not shown yet, and when to run again."""

    status: dict[str, Any] = field(default_factory=dict)
    written: dict[str, Any] | None = None  # the job as the last status write returned it
    created: set[str] = field(default_factory=set)  # pod names
    deleted: set[str] = field(default_factory=set)  # pod uids
    requeue_after: float | None = None
    refusals: int | None = None  # the new count of refused passes in a row (None: as it was)


class _Acting:
    """The cluster's verbs for one pass, remembering what they changed."""

    def __init__(self, cluster: Cluster, done: Pass) -> None:
        self.cluster, self.done = cluster, done

    def create(self, obj: dict[str, Any]) -> bool:
        made = self.cluster.create(obj)
        if made and obj["kind"] == "Pod":
            self.done.created.add(obj["metadata"]["name"])
        return made

    def delete_pod(self, pod: dict[str, Any]) -> bool:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            return False
        gone = self.cluster.delete_pod(meta["namespace"], meta["name"], meta["uid"])
        self.done.deleted.add(meta["uid"])
        return gone

    def patch_status(self, body: dict[str, Any], patch: dict[str, Any], **kw: Any) -> None:
        meta = body["metadata"]
        self.done.written = self.cluster.patch_status(meta["namespace"], meta["name"], patch, **kw)


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


def ended_coordinators(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's coordinator pods that have ended (phase Failed or Succeeded) and are
    not yet being deleted: the pod's restartPolicy is Never, so only a new pod helps."""
    return [
        p
        for p in pods
        if p["metadata"].get("labels", {}).get(render.LABEL_COMPONENT) == render.COORDINATOR
        and (p.get("status") or {}).get("phase") in ("Failed", "Succeeded")
        and not p["metadata"].get("deletionTimestamp")
    ]


def coordinator_end(pod: dict[str, Any]) -> str:
    """How a coordinator pod ended, in a few words (its reason, or its exit code)."""
    st = pod.get("status") or {}
    if st.get("reason"):
        return str(st["reason"])
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if "exitCode" in term:
            return f"exit code {term['exitCode']}"
    return f"phase {st.get('phase')}"


def reconcile(obs: Observed, cluster: Cluster) -> Pass:
    """Bring one job's children in line with its spec, from what the cache shows."""
    done = Pass()
    act = _Acting(cluster, done)
    body = obs.body
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    pods = [p for p in obs.pods if render.owned_by(p, meta.get("uid"))]
    for pod in obs.pods:
        # An earlier namesake's pod being deleted: it is not ours to count, and
        # only we would ever lift its finalizer. Every pass looks, so one failed
        # patch cannot leave it Terminating (a pod event comes only once).
        if pod["metadata"].get("deletionTimestamp") and not render.owned_by(pod, meta.get("uid")):
            cluster.release(pod, render.TRACKING_FINALIZER)
    if meta.get("deletionTimestamp"):
        # Going away with its pods: nothing left to count, nothing may hold them.
        for pod in pods:
            cluster.release(pod, render.TRACKING_FINALIZER)
        return done
    try:
        job = api.DecentralizedTrainingJob.from_body(body)
    except pydantic.ValidationError as err:
        done.status = _invalid(body, err)
        if status.differs(body.get("status"), done.status):
            _write(act, body, done.status)
        # The job has failed: its pods stop (they would keep training, and holding
        # GPUs, on a spec nobody can read); nothing is left to count, so nothing holds them.
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                cluster.release(pod, render.TRACKING_FINALIZER)
            elif pod["metadata"]["name"] in lifecycle.still_running([pod]):
                act.delete_pod(pod)
        return done

    # Observe and sort: what the cache shows, plus deletions it has not shown yet.
    old: dict[str, Any] = dict(body.get("status") or {})
    pods = [_going(p) if p["metadata"]["uid"] in obs.deleting else p for p in pods]
    leftovers = {p["metadata"]["name"] for p in obs.pods} - {p["metadata"]["name"] for p in pods}
    now = dt.datetime.now(dt.UTC)

    if old.get("phase") in lifecycle.TERMINAL:
        done.status = old
        done.requeue_after = _finished(act, job, body, pods, old, now)
        return done

    verdict = lifecycle.assess(job, pods, old, now)
    if verdict.reason == "BackoffLimitExceeded" and verdict.failed:
        done.status = _fail_on_failures(act, job, body, pods, verdict)
        return done
    counted = _account(act, job, body, pods, verdict)
    if counted is None:
        # The job changed meanwhile (a 409): try again soon, whatever changed it (a
        # progress-only update may bring no pass of its own).
        done.status = old
        done.requeue_after = RACE_SECONDS
        return done
    # Counted, also in an earlier pass that ended before its delete (a crash, a
    # hand-over, a 5xx): the replacement comes on a later pass, once the pod is gone.
    lost = verdict.failed + verdict.preempted + _counted_alive(pods, counted)
    for pod in lost:
        act.delete_pod(pod)
    for pod in ended_coordinators(pods):
        # Crashed, OOM-killed, evicted or exited: the job depends on it, so it is
        # replaced (on a later pass, once the name is free). Workers wait for it.
        log.warning(
            "coordinator %s/%s ended (%s); replacing it",
            ns,
            pod["metadata"]["name"],
            coordinator_end(pod),
        )
        if act.delete_pod(pod):
            metrics.COORDINATORS_REPLACED.inc()
    if verdict.phase is not None:
        done.status = status.compute(
            job, body, pods, finished=(verdict.phase, verdict.reason, verdict.message)
        )
        _write(act, body, done.status)
        _clean(act, job, pods, verdict.phase)
        return done
    gone = {p["metadata"]["name"] for p in lost}
    # A terminating pod still holds its name: its replacement comes once it is gone.
    existing = {p["metadata"]["name"] for p in pods} | obs.created

    # Desire and act: create what is missing, update the config, drop the unwanted.
    desired = render.desired_children(job, body, METRICS_FROM)
    wanted = {o["metadata"]["name"] for o in desired if o["kind"] == "Pod"}
    children = {(c["kind"], c["name"]): c for c in obs.children}
    problems: list[str] = []
    refused: list[str] = []  # the API server finds the spec invalid: retrying cannot help
    pods_blocked = obs.create_backoff > 0  # refused lately: wait, then try one
    foreign = False  # a child's name is taken by an object not this job's: no pods
    for obj in desired:
        kind, child = obj["kind"], obj["metadata"]["name"]
        if kind == "Pod" and child in existing:
            continue
        if kind == "Pod" and foreign:
            continue
        if kind == "Pod" and pods_blocked:
            if obs.create_backoff > 0 and done.requeue_after is None:
                problems.append(
                    f"pod creates were refused {obs.refusals} time(s) in a row (quota or "
                    f"admission); trying again in {obs.create_backoff:.0f}s"
                )
                done.requeue_after = obs.create_backoff
            continue
        if kind == "Pod" and child in leftovers:
            problems.append(
                f"pod {child} is left from an earlier job named {name}: waiting for it to "
                "go (delete it if it was orphaned)"
            )
            continue
        have = children.get((kind, child))
        if have is not None:
            if _foreign(have["owners"], meta["uid"]):
                problems.append(_not_ours(kind, child, name))
                foreign = True
                done.requeue_after = _earliest(done.requeue_after, RETRY_SECONDS)
            elif kind == "ConfigMap" and have["digest"] != digest(obj.get("data")):
                cluster.patch_config_map(ns, child, obj["data"])
            elif (
                kind == "NetworkPolicy"
                and have.get("applied") != (obj["metadata"]["annotations"][SPEC_DIGEST])
            ):
                cluster.update_network_policy(ns, child, obj)
                log.info("updated NetworkPolicy %s/%s", ns, child)
            continue
        try:
            if not act.create(obj):
                # It exists (409): ours, not yet in the cache, or someone else's.
                owners = cluster.owners(kind, ns, child) if kind != "Pod" else None
                if owners is not None and _foreign(owners, meta["uid"]):
                    problems.append(_not_ours(kind, child, name))
                    foreign = True
                    done.requeue_after = _earliest(done.requeue_after, RETRY_SECONDS)
            else:
                log.info("created %s %s/%s", kind, ns, child)
                component = obj["metadata"]["labels"].get(render.LABEL_COMPONENT)
                if kind == "Pod" and component == render.WORKER:
                    metrics.WORKERS_CREATED.inc()
        except ApiException as e:
            if e.status == 422:
                refused.append(f"{kind} {child}: {api_message(e)}")
                break
            # Quota, admission or RBAC refusals: say so in the status, create no more
            # pods this pass, and try again later, waiting longer each time.
            problems.append(f"cannot create {kind} {child}: {api_message(e)[:300]} ({e.status})")
            log.warning("cannot create %s %s/%s: %s", kind, ns, child, e.reason)
            if kind == "Pod":
                pods_blocked = True
                done.refusals = obs.refusals + 1
                done.requeue_after = create_backoff(done.refusals)
            else:
                done.requeue_after = RETRY_SECONDS
    if obs.refusals and not pods_blocked:
        done.refusals = 0  # every pod create went through again
    if refused:
        # An admitted spec the API server will not turn into pods (a mount of an
        # undeclared volume, a bad env var): end the job saying which field, not
        # retry forever.
        msg = (
            f"the API server refused {refused[0]}; fix spec.template (or the field it "
            "names) and create the job again"
        )
        done.status = status.compute(job, body, pods, finished=("Failed", "InvalidSpec", msg))
        _write(act, body, done.status)
        _clean(act, job, pods, "Failed")
        return done
    why = "suspended" if job.spec.run_policy.suspend else "scaled away"
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        if pod_name in wanted or status.is_terminating(pod):
            continue
        if render.tracked(pod):  # so a resume or a scale back up does not count it lost
            cluster.annotate_pod(ns, pod_name, {render.ANNOTATION_RELEASED: why})
        if act.delete_pod(pod):
            log.info("deleted pod %s/%s (no longer desired: %s)", ns, pod_name, why)

    # Status, once.
    live = [p for p in pods if p["metadata"]["name"] not in gone]
    done.status = status.compute(job, body, live, problems=problems)
    present = {p["metadata"].get("uid") for p in pods}
    if sorted(counted & present) != sorted(old.get("countedPods") or []):
        done.status["countedPods"] = sorted(counted & present)  # settled uids drop out
    if status.differs(old, done.status):
        _write(act, body, done.status)
    done.requeue_after = _earliest(
        done.requeue_after,
        lifecycle.deadline_in(job, done.status | {"activeSince": _since(old, done.status)}, now),
        EXPECTATION_SECONDS if obs.created or obs.deleting else None,
    )
    return done


def _foreign(owners: list[str], uid: str) -> bool:
    """Whether an object with a child's name belongs to someone else. One with no owner
    at all is used as before: it is what `--cascade=orphan` leaves of an earlier job of
    this name (the garbage collector drops the owner references); refusing those too
    needs the operator to delete them, which it may not (yet)."""
    return bool(owners) and uid not in owners


def _not_ours(kind: str, child: str, job: str) -> str:
    """Why the job waits: an object it would create exists and belongs to another."""
    return (
        f"{kind} {child} exists and is not this job's (no owner reference to job {job}): "
        "the job will not use it, nor start its pods, until it is deleted or renamed"
    )


def _counted_alive(pods: list[dict[str, Any]], counted: set[str]) -> list[dict[str, Any]]:
    """Pods already counted as lost and not yet being deleted (their delete was missed)."""
    return [p for p in pods if p["metadata"].get("uid") in counted and not status.is_terminating(p)]


def api_message(e: ApiException) -> str:
    """The API server's own sentence for a refusal (it names the field)."""
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)[:600]
    except ValueError:
        return str(e.reason)


def _since(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    return new["activeSince"] if "activeSince" in new else old.get("activeSince")


def _earliest(*delays: float | None) -> float | None:
    return min((d for d in delays if d is not None), default=None)


def _going(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod this operator deleted, as it will look once the cache shows it."""
    meta = pod["metadata"] | {"deletionTimestamp": status.now()}
    return pod | {"metadata": meta}


def _clean(
    act: _Acting, job: api.DecentralizedTrainingJob, pods: list[dict[str, Any]], phase: str
) -> None:
    """Delete what cleanPodPolicy says a job that ended in `phase` should not keep."""
    names = set(lifecycle.pods_to_clean(job, pods, failed=phase == "Failed"))
    for pod in pods:
        if pod["metadata"]["name"] in names:
            act.delete_pod(pod)


def _account(
    act: _Acting,
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
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
            act.patch_status(body, patch, resource_version=meta["resourceVersion"])
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
                    act.cluster.warn(body, "WorkerFailed", note)
                else:
                    note = lifecycle.preemption_note(pod)
                    act.cluster.event(body, "Normal", "WorkerPreempted", f"{note}; replacing it")
                log.info("worker %s/%s lost (%s)", meta["namespace"], pod["metadata"]["name"], note)
    for pod in settled:
        act.cluster.release(pod, render.TRACKING_FINALIZER)
    return counted


def _fail_on_failures(
    act: _Acting,
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
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
    _write(act, body, new, resource_version=meta["resourceVersion"])
    metrics.lost("failures", len(verdict.failed))
    for pod in verdict.failed:
        act.cluster.warn(body, "WorkerFailed", lifecycle.failure_note(pod))
    log.info("job %s/%s failed: %s", ns, name, verdict.message)
    _clean(act, job, pods, "Failed")
    return new


def _finished(
    act: _Acting,
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    old: dict[str, Any],
    now: dt.datetime,
) -> float | None:
    """A finished job: keep its pods cleaned up and honour ttlSecondsAfterFinished;
    returns the seconds until its TTL runs out."""
    meta = body["metadata"]
    _clean(act, job, pods, str(old.get("phase")))
    for pod in pods:  # a finished job counts no more losses
        if status.is_terminating(pod):
            act.cluster.release(pod, render.TRACKING_FINALIZER)
    left = lifecycle.ttl_left(job, old, now)
    if left is not None and left <= 0:
        log.info(
            "deleting finished job %s/%s (ttlSecondsAfterFinished)", meta["namespace"], meta["name"]
        )
        act.cluster.delete_job(meta["namespace"], meta["name"])
        return None
    return left


def _write(act: _Acting, body: dict[str, Any], new: dict[str, Any], **kwargs: Any) -> None:
    """Write the status, and tell the story in Events (`kubectl describe dtj`)."""
    act.patch_status(body, new, **kwargs)
    for kind, reason, message in status.transitions(body.get("status") or {}, new):
        act.cluster.event(body, kind, reason, message)
