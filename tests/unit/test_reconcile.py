"""One reconcile pass against a recording fake of the API (no control plane)."""

from __future__ import annotations

from typing import Any

from dtj_operator import observed, render
from dtj_operator.reconcile import reconcile

from tests.builders import job_body

SPEC = {"replicas": 2, "template": {"image": "trainer:dev"}}


class Recorder:
    """Answers every Cluster call with success and remembers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **_: Any) -> Any:
            self.calls.append((name, args))
            return {} if name == "patch_status" else True

        return call

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


def _leftover(name: str, owner: str) -> dict[str, Any]:
    return observed.pod(
        {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": f"old-{name}",
                "labels": {render.LABEL_JOB: "demo", render.LABEL_COMPONENT: render.WORKER},
                "ownerReferences": [{"uid": owner}],
                "finalizers": [render.TRACKING_FINALIZER],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
            },
            "status": {"phase": "Running"},
        }
    )


def test_an_earlier_namesakes_terminating_pod_is_released_by_any_pass():
    """The pod event that sees it go releases it first; if that patch fails, the
    next pass must, or the pod stays Terminating and the new job waits forever."""
    body = job_body(SPEC)
    gone = _leftover("demo-worker-0", owner="an-earlier-uid")
    cluster = Recorder()
    done = reconcile(observed.Observed(body=body, pods=[gone], children=[]), cluster)  # type: ignore[arg-type]
    assert [args[0]["metadata"]["uid"] for args in cluster.named("release")] == [
        gone["metadata"]["uid"]
    ]
    created = [args[0]["metadata"]["name"] for args in cluster.named("create")]
    assert "demo-worker-0" not in created, "a name still held by the leftover pod was created"
    assert "demo-worker-1" in created
    waiting = next(c for c in done.status["conditions"] if c["type"] == "Created")
    assert "left from an earlier job named demo" in waiting["message"]


def test_its_own_terminating_pod_is_counted_before_it_is_released():
    body = job_body(SPEC) | {"status": {"phase": "Running"}}
    body["metadata"]["resourceVersion"] = "7"
    own = _leftover("demo-worker-0", owner=body["metadata"]["uid"])
    cluster = Recorder()
    reconcile(observed.Observed(body=body, pods=[own], children=[]), cluster)  # type: ignore[arg-type]
    names = [n for n, _ in cluster.calls]
    assert names.count("release") == 1
    counted = next(args[2] for n, args in cluster.calls if n == "patch_status")
    assert counted["countedPods"] == [own["metadata"]["uid"]] and counted["preemptions"] == 1
    assert names.index("patch_status") < names.index("release"), "released before it was counted"


def _coordinator(phase: str, owner: str, **status: Any) -> dict[str, Any]:
    return observed.pod(
        {
            "metadata": {
                "name": "demo-coordinator",
                "namespace": "ns",
                "uid": "coord-1",
                "labels": {render.LABEL_JOB: "demo", render.LABEL_COMPONENT: render.COORDINATOR},
                "ownerReferences": [{"uid": owner}],
            },
            "status": {"phase": phase, **status},
        }
    )


def test_a_coordinator_that_ended_is_deleted_and_not_recreated_in_the_same_pass():
    """Issue 18, finding 10: a Failed coordinator (restartPolicy Never) stayed Failed for
    ever, since a pod whose name exists was skipped; every worker then timed out."""
    body = job_body(SPEC) | {"status": {"phase": "Running"}}
    ended = _coordinator(
        "Failed",
        body["metadata"]["uid"],
        containerStatuses=[{"state": {"terminated": {"exitCode": 137}}}],
    )
    cluster = Recorder()
    reconcile(observed.Observed(body=body, pods=[ended], children=[]), cluster)  # type: ignore[arg-type]
    assert cluster.named("delete_pod") == [("ns", "demo-coordinator", "coord-1")]
    pods = [a[0]["metadata"]["name"] for a in cluster.named("create") if a[0]["kind"] == "Pod"]
    assert "demo-coordinator" not in pods, "its name is still taken until it is gone"


def test_a_running_coordinator_is_left_alone():
    body = job_body(SPEC) | {"status": {"phase": "Running"}}
    live = _coordinator("Running", body["metadata"]["uid"])
    cluster = Recorder()
    reconcile(observed.Observed(body=body, pods=[live], children=[]), cluster)  # type: ignore[arg-type]
    assert cluster.named("delete_pod") == []


def test_a_spec_made_invalid_while_running_fails_the_job_and_stops_its_pods():
    """Issue 21: an edit the API server admitted but the operator cannot read (stored
    before a rule existed) turned the job Failed and left its pods training."""
    spec = {**SPEC, "template": {**SPEC["template"], "resources": {"limits": "1"}}}
    body = job_body(spec) | {"status": {"phase": "Running"}}  # admitted by an older schema
    owner = body["metadata"]["uid"]
    running = _coordinator("Running", owner)
    worker = _worker(owner, "Running")
    leaving = _leftover("demo-worker-1", owner=owner)
    cluster = Recorder()
    done = reconcile(
        observed.Observed(body=body, pods=[running, worker, leaving], children=[]),
        cluster,  # type: ignore[arg-type]
    )
    assert done.status["phase"] == "Failed"
    failed = next(c for c in done.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "resources" in failed["message"]
    assert sorted(a[1] for a in cluster.named("delete_pod")) == [
        "demo-coordinator",
        "demo-worker-0",
    ]
    assert [a[0]["metadata"]["name"] for a in cluster.named("release")] == ["demo-worker-1"]
    assert not cluster.named("create")


def _worker(owner: str, phase: str, slot: int = 0) -> dict[str, Any]:
    """A tracked worker pod of the job owned by `owner`."""
    labels = {
        render.LABEL_JOB: "demo",
        render.LABEL_COMPONENT: render.WORKER,
        render.LABEL_SLOT: str(slot),
    }
    return observed.pod(
        {
            "metadata": {
                "name": f"demo-worker-{slot}",
                "namespace": "ns",
                "uid": f"w{slot}",
                "labels": labels,
                "ownerReferences": [{"uid": owner}],
                "finalizers": [render.TRACKING_FINALIZER],
            },
            "status": {"phase": phase},
        }
    )


def test_a_failure_counted_by_a_pass_that_died_before_its_delete_is_deleted_by_the_next():
    """Issue 21: the count is written before the delete; a crash, a hand-over or a 5xx in
    between left a Failed pod whose uid was counted: skipped by the count (rightly), its
    name taken, never deleted, its slot never refilled."""
    body = job_body(SPEC)
    body["status"] = {"phase": "Running", "failures": 1, "countedPods": ["w0"]}
    body["metadata"]["resourceVersion"] = "9"
    failed = _worker(body["metadata"]["uid"], "Failed")
    cluster = Recorder()
    reconcile(
        observed.Observed(body=body, pods=[failed], children=[]),
        cluster,  # type: ignore[arg-type]
    )
    assert cluster.named("delete_pod") == [("ns", "demo-worker-0", "w0")]
    counts = [a[2] for a in cluster.named("patch_status") if "failures" in a[2]]
    assert not counts, "counted twice"
    created = [a[0]["metadata"]["name"] for a in cluster.named("create")]
    assert "demo-worker-0" not in created  # once it is gone


def test_a_count_that_loses_a_write_race_is_tried_again_soon():
    """Issue 21: a 409 on the count's patch returned and waited for the job's next event,
    which a progress-only update filters out."""
    from kubernetes.client.exceptions import ApiException

    class Conflict(Recorder):
        def patch_status(self, *args: Any, **kw: Any) -> Any:
            raise ApiException(status=409, reason="Conflict")

    body = job_body(SPEC) | {"status": {"phase": "Running"}}
    body["metadata"]["resourceVersion"] = "9"
    failed = _worker(body["metadata"]["uid"], "Failed")
    done = reconcile(
        observed.Observed(body=body, pods=[failed], children=[]),
        Conflict(),  # type: ignore[arg-type]
    )
    assert done.requeue_after is not None and done.requeue_after <= 2


def test_a_suspended_jobs_workers_are_marked_released_before_their_delete():
    body = job_body({**SPEC, "runPolicy": {"suspend": True}}) | {"status": {"phase": "Running"}}
    owner = body["metadata"]["uid"]
    running = _worker(owner, "Running", slot=1)
    cluster = Recorder()
    reconcile(observed.Observed(body=body, pods=[running], children=[]), cluster)  # type: ignore[arg-type]
    names = [n for n, _ in cluster.calls if n in ("annotate_pod", "delete_pod")]
    assert names == ["annotate_pod", "delete_pod"]
    assert cluster.named("annotate_pod")[0][2] == {render.ANNOTATION_RELEASED: "suspended"}


def test_refused_pod_creates_back_off_instead_of_storming_the_api_server():
    """Issue 21: behind a quota every missing pod was POSTed on every pass (a 1,000-worker
    job made ~100 refused POSTs a second). Now a pass stops at the first refusal, and the
    next pod create waits 10 s, then 20 s, 40 s ... however many passes run meanwhile."""
    from dtj_operator.watchcache import WatchCache
    from kubernetes.client.exceptions import ApiException

    class Quota(Recorder):
        full = True

        def create(self, obj: dict[str, Any]) -> bool:
            self.calls.append(("create", (obj,)))
            if obj["kind"] == "Pod" and self.full:
                raise ApiException(status=403, reason="Forbidden: exceeded quota")
            return True

        def patch_status(self, _ns: str, _name: str, patch: dict[str, Any], **_: Any) -> Any:
            self.calls.append(("patch_status", (patch,)))
            return {**body, "status": {**body["status"], **patch}}  # the job as written

    body = job_body({**SPEC, "replicas": 50}) | {"status": {"phase": "Pending"}}
    key = ("ns", "demo")
    clock = [0.0]
    cache = WatchCache(clock=lambda: clock[0])
    cache.attach(jobs={key: [body]}, pods={key: []})
    cluster = Quota()

    def one_pass() -> tuple[int, float | None]:
        before = len([a for a in cluster.named("create") if a[0]["kind"] == "Pod"])
        obs = cache.snapshot(key)
        assert obs is not None
        done = reconcile(obs, cluster)  # type: ignore[arg-type]
        cache.remember(key, obs, done)
        after = len([a for a in cluster.named("create") if a[0]["kind"] == "Pod"])
        return after - before, done.requeue_after

    assert one_pass() == (1, 10.0)  # one refused POST, not 51
    for _ in range(20):  # passes that pod or job events bring meanwhile: no POST at all
        clock[0] += 0.4
        assert one_pass()[0] == 0
    clock[0] = 10.1
    assert one_pass() == (1, 20.0)  # tried again after 10 s, then waits twice as long
    clock[0] = 20.0
    assert one_pass()[0] == 0
    clock[0] = 30.2
    cluster.full = False  # the quota was raised: every pod at once
    assert one_pass()[0] == 51
    assert cache.snapshot(key).refusals == 0  # type: ignore[union-attr]


def test_an_object_with_a_childs_name_that_the_job_does_not_own_is_reported_not_used():
    """Issue 21: a pre-existing Service (or NetworkPolicy, or <job>-config) with a child's
    name was used as if it were the job's (409 counted as success): isolation could be
    missing with Created=ChildrenCreated. Now no pod starts and Created says which."""
    body = job_body(SPEC)
    impostor = {"kind": "Service", "name": "demo", "owners": ["someone-else"], "digest": ""}
    cluster = Recorder()
    done = reconcile(observed.Observed(body=body, pods=[], children=[impostor]), cluster)  # type: ignore[arg-type]
    assert not [a for a in cluster.named("create") if a[0]["kind"] == "Pod"]
    created = next(c for c in done.status["conditions"] if c["type"] == "Created")
    assert (
        created["status"] == "False"
        and "Service demo exists and is not this job's" in (created["message"])
    )
    assert done.requeue_after == 10.0  # it looks again (an earlier namesake's goes with GC)

    class Taken(Recorder):  # not in the cache at all (no labels): the create says 409
        def create(self, obj: dict[str, Any]) -> bool:
            self.calls.append(("create", (obj,)))
            return obj["kind"] != "NetworkPolicy"

        def owners(self, kind: str, _ns: str, name: str) -> list[str]:
            return ["someone-else"]

    cluster = Taken()
    done = reconcile(observed.Observed(body=body, pods=[], children=[]), cluster)  # type: ignore[arg-type]
    assert not [a for a in cluster.named("create") if a[0]["kind"] == "Pod"]
    created = next(c for c in done.status["conditions"] if c["type"] == "Created")
    assert "NetworkPolicy" in created["message"] and "is not this job's" in created["message"]


def test_a_changed_network_policy_reaches_a_job_created_before_the_change():
    """Issue 21: children were create-only, so a changed networkPolicy.metricsFrom (or a
    fixed rule) never reached existing jobs. The policy carries the digest of the spec
    the operator wrote; a different desired spec is patched in."""
    from dtj_operator.reconcile import METRICS_FROM

    body = job_body(SPEC)
    uid = body["metadata"]["uid"]
    children = render.desired_children(job_of(body), body, METRICS_FROM)
    policy = next(o for o in children if o["kind"] == "NetworkPolicy")
    current = policy["metadata"]["annotations"][observed.SPEC_DIGEST]
    mine = {"kind": "NetworkPolicy", "name": "demo", "owners": [uid], "digest": ""}
    for applied, updates in ((current, []), ("old", ["demo"])):
        cluster = Recorder()
        seen = observed.Observed(body=body, pods=[], children=[mine | {"applied": applied}])
        reconcile(seen, cluster)  # type: ignore[arg-type]
        assert [a[1] for a in cluster.named("update_network_policy")] == updates


def job_of(body: dict[str, Any]) -> Any:
    from dtj_operator import api

    return api.DecentralizedTrainingJob.from_body(body)
