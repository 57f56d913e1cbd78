"""The operator's own metrics and ownership checks (no cluster)."""

from __future__ import annotations

from dtj_operator import metrics, render
from dtj_operator.cli import operator_command
from prometheus_client import REGISTRY


def jobs(phase: str) -> float | None:
    return REGISTRY.get_sample_value("dtj_operator_jobs", {"phase": phase})


def test_jobs_by_phase_follow_each_job_and_drop_to_zero():
    metrics.job_phase("ns", "a", "Running")
    metrics.job_phase("ns", "b", "Running")
    assert jobs("Running") == 2
    metrics.job_phase("ns", "a", "Succeeded")
    assert (jobs("Running"), jobs("Succeeded")) == (1, 1)
    metrics.job_phase("ns", "a", None)
    metrics.job_phase("ns", "b", None)
    assert (jobs("Running"), jobs("Succeeded")) == (0, 0)


def test_losses_are_counted_by_kind():
    def losses(kind: str) -> float:
        value = REGISTRY.get_sample_value("dtj_operator_worker_losses_total", {"kind": kind})
        return value or 0.0

    pre, fail = losses("preemption"), losses("failure")
    metrics.lost("preemptions")
    metrics.lost("failures", 2)
    assert (losses("preemption") - pre, losses("failure") - fail) == (1, 2)


def test_a_pod_belongs_to_the_job_whose_uid_owns_it():
    pod = {"metadata": {"ownerReferences": [{"uid": "new"}]}}
    assert render.owned_by(pod, "new")
    assert not render.owned_by(pod, "old")
    assert not render.owned_by({"metadata": {}}, "new")  # orphaned
    assert not render.owned_by(pod, None)


def test_the_liveness_endpoint_is_passed_to_kopf():
    assert "--liveness=http://0.0.0.0:8081/healthz" in operator_command(
        None, "http://0.0.0.0:8081/healthz"
    )
    assert not any(a.startswith("--liveness") for a in operator_command("ns"))


def test_every_loss_kind_is_exported_at_zero_before_the_first_loss():
    """Prometheus's increase() misses the first loss of a series born at 1."""
    import subprocess
    import sys

    probe = (
        "from dtj_operator import metrics; from prometheus_client import REGISTRY as R; "
        "print([R.get_sample_value('dtj_operator_worker_losses_total', {'kind': k}) "
        "for k in ('preemption', 'failure')])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0.0, 0.0]"
