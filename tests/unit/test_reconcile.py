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
