"""The pass around reconcile: what happens when the job vanished mid-pass."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dtj_operator import handlers, render
from kubernetes.client.exceptions import ApiException


def test_a_job_deleted_during_its_pass_releases_its_terminating_pods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 21: a 404 from a pass whose job is gone forgot the job and left its
    terminating pods held by the tracking finalizer (no later pass would come)."""
    key = ("ns", "demo")
    going = {"metadata": {"name": "demo-worker-0", "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    released: list[str] = []

    class Cluster:
        def release(self, pod: dict[str, Any], finalizer: str) -> None:
            assert finalizer == render.TRACKING_FINALIZER
            released.append(pod["metadata"]["name"])

        def job_exists(self, *_: Any) -> bool:
            return False

    def gone(_obs: Any) -> Any:
        raise ApiException(status=404, reason="Not Found")

    monkeypatch.setattr(handlers, "_cluster", Cluster)
    monkeypatch.setattr(handlers, "_run_pass", gone)
    monkeypatch.setattr(handlers._cache, "snapshot", lambda _k: object())
    monkeypatch.setattr(handlers._cache, "forget", lambda _k: None)
    monkeypatch.setitem(handlers._cache.indexes, "pods", {key: [going]})
    assert asyncio.run(handlers._pass(key)) is None
    assert released == ["demo-worker-0"]


def test_a_failed_pass_is_told_on_the_job_as_a_warning_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 21: a pass that raised was retried with backoff and logged by the operator
    only: nothing on the object said why it stood still."""
    warned: list[tuple[str, str]] = []
    patched: list[tuple[str, dict[str, Any], str | None]] = []

    class Cluster:
        def warn(self, _body: Any, reason: str, message: str) -> None:
            warned.append((reason, message))

        def patch_status(self, _ns: str, name: str, patch: dict[str, Any], **kw: Any) -> None:
            patched.append((name, patch, kw.get("resource_version")))

    def broken(*_: Any) -> Any:
        raise RuntimeError("the API server answered 500: etcdserver: request timed out")

    monkeypatch.setattr(handlers, "_cluster", Cluster)
    monkeypatch.setattr(handlers, "reconcile", broken)
    meta = {"name": "demo", "namespace": "ns", "resourceVersion": "7", "generation": 2}
    running = {"type": "Running", "status": "True", "reason": "WorkersReady"}
    body = {"metadata": meta, "status": {"conditions": [running]}}
    obs = type("Obs", (), {"body": body})()
    with pytest.raises(RuntimeError):
        handlers._run_pass(obs)  # type: ignore[arg-type]
    assert warned == [
        (
            "ReconcileFailed",
            "the operator could not reconcile this job (RuntimeError: the API server answered "
            "500: etcdserver: request timed out); it tries again with backoff",
        )
    ]
    # ... and the job's Reconciled condition turns False saying the same, written
    # only over the status the pass read (a newer pass decides otherwise).
    ((name, patch, version),) = patched
    assert (name, version) == ("demo", "7")
    conds = {c["type"]: c for c in patch["conditions"]}
    assert conds["Running"] == running
    assert conds["Reconciled"]["status"] == "False"
    assert conds["Reconciled"]["reason"] == "ReconcileFailed"
    assert conds["Reconciled"]["message"] == warned[0][1]
    assert conds["Reconciled"]["observedGeneration"] == 2
