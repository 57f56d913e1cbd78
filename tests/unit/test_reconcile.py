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
