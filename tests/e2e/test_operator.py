"""The operator as its users watch it: Events, its own metrics, and one job's pods only.

Runs on kwok's nodes (the quickstart's pods run nothing there), against the
session's operator process, whose metrics endpoint is on loopback.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from dtj_operator import handlers
from dtj_operator.cluster import Cluster
from kubernetes import client
from kubernetes.config import kube_config
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.kube import ROOT, Kube, running_pods, wait_for

pytestmark = pytest.mark.e2e
EXAMPLE = str(ROOT / "examples" / "quickstart.yaml")
WORKERS = "training.dtj.io/job=quickstart,app.kubernetes.io/component=worker"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the operator's metrics: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def running_workers(kube: Kube, namespace: str) -> list[dict] | None:
    return running_pods(kube, namespace, WORKERS, 4)


def test_metrics_and_events_follow_the_job(kube: Kube, operator, operator_metrics, namespace):
    before = scrape(operator_metrics)
    kube.run("apply", "-n", namespace, "-f", EXAMPLE)
    pods = wait_for("4 running workers", lambda: running_workers(kube, namespace))
    wait_for(
        "the job Running",
        lambda: (
            kube.json("get", "dtj", "quickstart", "-n", namespace).get("status", {}).get("phase")
            == "Running"
        ),
    )
    running = scrape(operator_metrics)
    created = "dtj_operator_workers_created_total"
    assert value(running, created) - value(before, created) >= 4
    assert value(running, "dtj_operator_jobs", phase="Running") >= 1
    ok = "dtj_operator_reconciles_total"
    assert value(running, ok, result="ok") > value(before, ok, result="ok")
    passes = "dtj_operator_reconcile_duration_seconds_count"
    assert value(running, passes) > value(before, passes)
    calls = "dtj_operator_api_requests_total"
    assert value(running, calls, method="PATCH") > value(before, calls, method="PATCH")
    assert value(running, calls, method="POST") - value(before, calls, method="POST") >= 4

    victim = pods[0]["metadata"]["name"]
    kube.run("delete", "pod", victim, "-n", namespace, "--wait=false")
    lost = "dtj_operator_worker_losses_total"
    wait_for(
        "the deleted worker counted as a preemption",
        lambda: (
            value(scrape(operator_metrics), lost, kind="preemption")
            > value(before, lost, kind="preemption")
        ),
    )
    wait_for("its replacement running", lambda: running_workers(kube, namespace))
    described = kube.run("describe", "dtj", "quickstart", "-n", namespace).stdout
    assert "WorkerPreempted" in described and victim in described, described
    started = kube.json("get", "events", "-n", namespace, "--field-selector", "reason=Running")[
        "items"
    ]
    assert any(e["involvedObject"]["name"] == "quickstart" for e in started), started
    after = scrape(operator_metrics)
    assert value(after, lost, kind="failure") == value(before, lost, kind="failure")

    kube.run("delete", "dtj", "quickstart", "-n", namespace)
    wait_for(
        "the deleted job gone from the per-phase gauge",
        lambda: (
            value(scrape(operator_metrics), "dtj_operator_jobs", phase="Running")
            < value(running, "dtj_operator_jobs", phase="Running")
        ),
    )


def test_a_job_recreated_under_the_same_name_does_not_adopt_old_pods(
    kube: Kube, operator, namespace
):
    """The old job is deleted leaving its pods (orphaned): the new one must neither
    take them as its own nor count their end as its preemptions; it says why it
    waits and starts its own once they are gone."""
    ns = ["-n", namespace]
    kube.run("apply", *ns, "-f", EXAMPLE)
    old = {
        p["metadata"]["uid"]
        for p in wait_for("4 running workers", lambda: running_workers(kube, namespace))
    }
    kube.run("delete", "dtj", "quickstart", *ns, "--cascade=orphan")
    wait_for(
        "the old job gone",
        lambda: kube.run("get", "dtj", "quickstart", *ns, check=False).returncode != 0,
    )
    kube.run("apply", *ns, "-f", EXAMPLE)

    def waiting() -> str | None:
        st = kube.json("get", "dtj", "quickstart", *ns).get("status", {})
        cond = next((c for c in st.get("conditions", []) if c["type"] == "Created"), {})
        return cond.get("message") if cond.get("status") == "False" else None

    message = wait_for("the new job saying what it waits for", waiting)
    assert "left from an earlier job named quickstart" in message, message
    status = kube.json("get", "dtj", "quickstart", *ns)["status"]
    assert not status.get("readyReplicas"), "the new job counted the old job's pods as its own"

    kube.run("delete", "pods", *ns, "-l", WORKERS, "--wait=false")
    pods = wait_for("the new job's own workers", lambda: running_workers(kube, namespace))
    uid = kube.json("get", "dtj", "quickstart", *ns)["metadata"]["uid"]
    assert not {p["metadata"]["uid"] for p in pods} & old
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in pods)
    status = kube.json("get", "dtj", "quickstart", *ns)["status"]
    assert not status.get("preemptions") and not status.get("failures"), status


def test_the_resync_lists_the_operators_pods_by_metadata_only(
    kube: Kube, namespace, monkeypatch: pytest.MonkeyPatch
):
    """The periodic resync (watchcache.stale) asks the real API server for the
    managed pods' metadata (PartialObjectMetadataList): it must get every uid."""

    def pod(name: str, labels: dict[str, str]) -> str:
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }
        kube.run("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        return kube.json("get", "pod", name, "-n", namespace)["metadata"]["uid"]

    ours = pod("ours", {"app.kubernetes.io/managed-by": "dtj-operator"})
    other = pod("other", {"app.kubernetes.io/managed-by": "someone-else"})
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kube.kubeconfig))
    # Cluster() loads it as the process's default client config: put back the old one
    # afterwards (the unit tests in this process build clients of their own).
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)
    listed = Cluster().pod_uids(handlers.MANAGED_SELECTOR, namespace)
    assert ours in listed and other not in listed
    assert ours in Cluster().pod_uids(handlers.MANAGED_SELECTOR)  # every namespace
