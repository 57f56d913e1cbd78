"""kopf wiring: watch caches in, one coalescing queue of reconcile passes out.

Run with `kopf run -m dtj_operator.handlers` (what the operator image does).
kopf watches the jobs and, with a server-side label selector, only the
objects this operator made; indexes keep what a pass reads (`observed`).
Every event whose projection changed kicks its job in the work queue, which
runs one pass per job at a time, merges bursts, and runs a pass again later
only when a deadline, a TTL or a refused create asks for it: no polling timer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import functools
import logging
import os
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import api, lifecycle, metrics, observed, render, status
from .cluster import Cluster
from .reconcile import reconcile
from .watchcache import Key, WatchCache
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

MANAGED = {"app.kubernetes.io/managed-by": render.MANAGED_BY}
# (group, version, plural) of the children other than pods, each with its index.
CHILDREN = {
    "configmaps": ("", "v1", "configmaps"),
    "services": ("", "v1", "services"),
    "serviceaccounts": ("", "v1", "serviceaccounts"),
    "roles": ("rbac.authorization.k8s.io", "v1", "roles"),
    "rolebindings": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    "networkpolicies": ("networking.k8s.io", "v1", "networkpolicies"),
}
PASSES_AT_ONCE = 8
# A namespace pattern (`dtj operator --namespace='team-*'`), applied to cluster-wide watches.
NAMESPACES = os.environ.get("DTJ_NAMESPACES", "")


def ours(namespace: str | None, **_: Any) -> bool:
    """Whether the operator looks after this namespace's jobs (kopf `when=` filter)."""
    if not namespace:
        return False
    patterns = [p for p in NAMESPACES.split(",") if p]
    return not patterns or any(fnmatch.fnmatchcase(namespace, p) for p in patterns)


_cache = WatchCache(children_indexes=tuple(CHILDREN))
_seen: dict[Any, Any] = {}  # object -> its last projection: skip events that change nothing
_moving: set[str] = set()  # uids of workers being moved off a disrupted node
_executor = concurrent.futures.ThreadPoolExecutor(PASSES_AT_ONCE, thread_name_prefix="pass")
_tasks: set[asyncio.Task[None]] = set()  # the resync loop, while the operator runs
_draining: dict[str, asyncio.Task[None]] = {}  # node -> moving the rest of its workers
DRAIN_RETRY_SECONDS = 5.0
# Every so often the pods are listed: what a watch gap hid is found (watchcache.stale).
RESYNC_SECONDS = 300
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={render.MANAGED_BY}"


@functools.cache
def _cluster() -> Cluster:
    return Cluster()


def _run_pass(obs: observed.Observed) -> Any:
    with metrics.RECONCILE_SECONDS.time():
        try:
            done = reconcile(obs, _cluster())
        except Exception as e:
            metrics.RECONCILES.labels(result="error").inc()
            if not (isinstance(e, ApiException) and e.status == 404):
                # On the object, not only in the operator's log (`kubectl describe dtj`);
                # the queue's backoff (10 s doubling to 300 s) bounds how often.
                first = (str(e).splitlines() or [""])[0][:300]
                message = (
                    f"the operator could not reconcile this job ({type(e).__name__}: "
                    f"{first}); it tries again with backoff"
                )
                _cluster().warn(obs.body, "ReconcileFailed", message)
                _mark_failed(obs.body, message)
            raise
    metrics.RECONCILES.labels(result="ok").inc()
    return done


def _mark_failed(body: dict[str, Any], message: str) -> None:
    """Reconciled=False on the job, unless someone wrote it since the body was read
    (then a newer pass decides) or the API server refuses this write too."""
    meta = body["metadata"]
    try:
        _cluster().patch_status(
            meta["namespace"],
            meta["name"],
            status.failed_pass(body, message),
            resource_version=meta.get("resourceVersion"),
        )
    except ApiException as e:
        where = f"{meta['namespace']}/{meta['name']}"
        log.warning("could not mark %s not reconciled: %s", where, e.reason)


def _release_orphans(key: Key) -> None:
    """Lift the tracking finalizer off terminating pods whose job is gone (the
    garbage collector is deleting them): nobody is left to count them."""
    for pod in list(_cache.indexes["pods"].get(key, ())):
        if pod["metadata"].get("deletionTimestamp"):
            _cluster().release(pod, render.TRACKING_FINALIZER)


async def _pass(key: Key) -> float | None:
    obs = _cache.snapshot(key)
    loop = asyncio.get_running_loop()
    if obs is None:
        metrics.job_phase(*key, None)
        # A failure raises: the queue retries with backoff (an event comes only once).
        await loop.run_in_executor(_executor, _release_orphans, key)
        return None
    try:
        done = await loop.run_in_executor(_executor, _run_pass, obs)
    except ApiException as e:
        if e.status != 404 or await loop.run_in_executor(_executor, _cluster().job_exists, *key):
            raise
        # Gone (with its namespace) before the watch said so: its terminating pods
        # have nobody left to count them either.
        await loop.run_in_executor(_executor, _release_orphans, key)
        _cache.forget(key)
        return None
    _cache.remember(key, obs, done)
    phase = done.status.get("phase") or (obs.body.get("status") or {}).get("phase") or "Pending"
    metrics.job_phase(*key, phase)
    return done.requeue_after


@functools.cache
def _queue() -> WorkQueue:
    return WorkQueue(_pass, concurrency=PASSES_AT_ONCE)


def _kick_if_changed(who: Any, projection: Any, key: Key, deleted: bool) -> None:
    if deleted:
        _seen.pop(who, None)
    elif _seen.get(who) == projection:
        return
    else:
        _seen[who] = projection
    _queue().kick(key)


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
    # One namespace watched (`dtj operator --namespace=NAME`, the chart with a Role):
    # no namespace listing or CRD re-scans, which that Role does not allow.
    settings.scanning.disabled = os.environ.get("DTJ_ONE_NAMESPACE") == "1"
    # Only this operator's objects come over the wire (not every pod of the cluster).
    for group, version, plural in [("", "v1", "pods"), *CHILDREN.values()]:
        settings.watching.label_selectors[group, version, plural] = MANAGED_SELECTOR
    port = metrics.serve_from_env()
    if port is not None:
        logger.info("serving the operator's metrics on port %d (/metrics)", port)


@kopf.on.startup()
async def start_resync(**_: Any) -> None:
    """The periodic pod resync, on kopf's event loop until the operator stops."""
    _tasks.add(asyncio.create_task(_resync_forever()))


@kopf.on.cleanup()
async def stop_resync(**_: Any) -> None:
    for task in _tasks:
        task.cancel()
    _tasks.clear()


def _resync() -> set[Key]:
    """One resync: the pods the index holds that the API server no longer has."""
    indexed = _cache.indexed_pods() if "pods" in _cache.indexes else {}
    one = NAMESPACES if os.environ.get("DTJ_ONE_NAMESPACE") == "1" else None
    listed = _cluster().pod_uids(MANAGED_SELECTOR, one)
    return _cache.purge(indexed, listed)


async def _resync_forever() -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        try:
            stale = await loop.run_in_executor(_executor, _resync)
        except Exception as e:  # the API server is away: the next resync looks again
            log.warning(
                "pod resync failed (%s: %s); next in %ds", type(e).__name__, e, RESYNC_SECONDS
            )
            continue
        for key in stale:
            log.info("resync: pods of %s/%s deleted during a watch gap; reconciling", *key)
            _queue().kick(key)


# The watch caches. kopf fills them before it runs any other handler.


@kopf.index(api.GROUP, api.VERSION, api.PLURAL, when=ours)
def jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): {k: body.get(k) for k in ("metadata", "spec", "status")}}


@kopf.index("", "v1", "pods", labels=MANAGED, when=ours)
def pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    job = labels.get(render.LABEL_JOB)
    return {(namespace, job): observed.pod(dict(body))} if job else None


@kopf.index("", "v1", "pods", labels=MANAGED, when=ours)
def workers_by_node(labels: kopf.Labels, spec: kopf.Spec, body: kopf.Body, **_: Any) -> Any:
    node = spec.get("nodeName")
    if not node or labels.get(render.LABEL_COMPONENT) != render.WORKER:
        return None
    return {node: observed.pod(dict(body))}


def _child_index(plural: str) -> None:
    def index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
        job = labels.get(render.LABEL_JOB)
        return {(namespace, job): observed.child(dict(body))} if job else None

    async def event(type: str, namespace: str | None, labels: kopf.Labels, **kw: Any) -> None:
        _attach(kw)
        job = labels.get(render.LABEL_JOB)
        if job and namespace and type in ("DELETED", "ADDED", "MODIFIED"):
            _queue().kick((namespace, job))

    index.__name__ = plural
    event.__name__ = f"{plural}_event"
    kopf.index(*CHILDREN[plural], labels=MANAGED, when=ours, id=plural)(index)
    kopf.on.event(*CHILDREN[plural], labels=MANAGED, when=ours, id=f"{plural}_event")(event)


for _plural in CHILDREN:
    _child_index(_plural)
_INDEXES = {"jobs", "pods", "workers_by_node", *CHILDREN}


def _attach(kw: dict[str, Any]) -> None:
    _cache.attach(**{k: v for k, v in kw.items() if k in _INDEXES})


# Events: each kicks its job's pass when something a pass reads changed.


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, when=ours)
async def job_event(
    type: str, name: str, namespace: str | None, body: kopf.Body, **kw: Any
) -> None:
    _attach(kw)
    if not namespace:
        return
    key = (namespace, name)
    if type == "DELETED":
        _seen.pop(key, None)
        _queue().forget(key)
        _cache.forget(key)
        metrics.job_phase(namespace, name, None)
        return
    _kick_if_changed(key, observed.job(dict(body)), key, deleted=False)


@kopf.on.event("", "v1", "pods", labels=MANAGED, when=ours)
async def pod_event(type: str, body: kopf.Body, namespace: str | None, **kw: Any) -> None:
    """A change of a job's pod runs a pass of that job. Losses are counted there,
    from the pods' state (the tracking finalizer keeps an ended worker until then),
    never from this event: events can be missed, a pod's last state cannot."""
    _attach(kw)
    meta = body.get("metadata") or {}
    job_name = (meta.get("labels") or {}).get(render.LABEL_JOB)
    if not job_name or not namespace:
        return
    pod = observed.pod(dict(body))
    key = (namespace, job_name)
    if type == "DELETED":
        _moving.discard(meta.get("uid"))
    _kick_if_changed(meta.get("uid"), pod, key, deleted=type == "DELETED")


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str, body: kopf.Body, **kw: Any) -> None:
    """Move workers off a node that announces its end, before it takes them down:
    all at once when it has minutes left, else a few at a time through the Eviction
    API (`lifecycle.may_move`), the rest as the first ones' replacements are ready.
    The pass that sees them go counts them as preemptions, with this reason."""
    _attach(kw)
    node = body["metadata"]["name"]
    reason = lifecycle.disruption(dict(body)) if type != "DELETED" else None
    if reason is None:
        if (task := _draining.pop(node, None)) is not None:
            task.cancel()  # uncordoned: the workers left there stay
        return
    urgent = lifecycle.urgent(dict(body))
    if (waiting := await _move_off(node, reason, urgent)) and node not in _draining:
        log.info(
            "%s: %d workers wait for their job's disruption budget (replicas - minReplicas)"
            " or a PodDisruptionBudget before they move",
            reason,
            waiting,
        )
        _draining[node] = asyncio.create_task(_keep_moving(node, reason, urgent))


async def _keep_moving(node: str, reason: str, urgent: bool) -> None:
    """Workers a budget held back leave as the others' replacements become ready."""
    try:
        while True:
            await asyncio.sleep(DRAIN_RETRY_SECONDS)
            if not await _move_off(node, reason, urgent):
                return
    finally:
        if _draining.get(node) is asyncio.current_task():
            del _draining[node]


def _budget(key: Key) -> int:
    """How many of the job's workers may start moving now (its own disruption budget,
    less those moved whose going the cache does not show yet)."""
    obs = _cache.snapshot(key)
    if obs is None:
        return 0
    try:
        job = api.DecentralizedTrainingJob.from_body(obs.body)
    except ValueError:
        return 1  # a spec the operator cannot read: one at a time
    unseen = sum(
        1
        for p in obs.pods
        if p["metadata"]["uid"] in _moving
        and not p["metadata"].get("deletionTimestamp")
        and status.is_ready(p)
    )
    return max(0, lifecycle.may_move(job, obs.pods) - unseen)


async def _move_off(node: str, reason: str, urgent: bool) -> int:
    """Move what may move of the workers on `node`; returns how many must wait."""
    by_job: dict[Key, list[dict[str, Any]]] = {}
    for pod in list(_cache.indexes["workers_by_node"].get(node, ())):
        meta = pod["metadata"]
        key = (meta["namespace"], meta["labels"][render.LABEL_JOB])
        job = _cache.job(key)
        going = meta.get("deletionTimestamp") or meta["uid"] in _moving
        if going or job is None or not render.owned_by(pod, job["metadata"].get("uid")):
            continue  # going already, or its job is gone (the garbage collector takes it)
        by_job.setdefault(key, []).append(pod)
    loop = asyncio.get_running_loop()
    waiting = 0
    for key, pods in by_job.items():
        job = _cache.job(key)
        budget = len(pods) if urgent else _budget(key)
        for pod in pods[:budget]:
            uid = pod["metadata"]["uid"]
            _moving.add(uid)
            why = f"moved away, {reason}"
            if not await loop.run_in_executor(_executor, _move_away, job, pod, why, not urgent):
                _moving.discard(uid)  # a PodDisruptionBudget said not now
                waiting += 1
        waiting += max(0, len(pods) - budget)
        _queue().kick(key)
    return waiting


def _move_away(job: Any, pod: dict[str, Any], why: str, evict: bool) -> bool:
    """Annotate why, then evict (or delete) the pod; False when eviction was refused
    for now (the note comes off again: the pod stays where it is)."""
    meta, cluster = pod["metadata"], _cluster()
    ns, name = meta["namespace"], meta["name"]
    cluster.annotate_pod(ns, name, {render.ANNOTATION_MOVED: why})
    if evict and not cluster.evict_pod(ns, name, meta["uid"]):
        cluster.annotate_pod(ns, name, {render.ANNOTATION_MOVED: None})
        return False
    if evict or cluster.delete_pod(ns, name, meta["uid"]):
        cluster.event(job, "Normal", "WorkerMoved", lifecycle.preemption_note(pod, why))
    return True
