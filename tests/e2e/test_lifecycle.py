"""Flows 2, 3 and 5 on a real API server: scale, replacement, preemption vs failure,
suspension, completion and TTL. Exits are driven by kwok's dtj-simulate-exit stage."""

from __future__ import annotations

import json
import re
import time

import pytest
from dtj_devcluster import controlplane as devcluster

from tests.e2e.kube import Kube, wait_for

pytestmark = pytest.mark.e2e
WORKERS = "training.dtj.io/job={},app.kubernetes.io/component=worker"


def job(name: str, **spec) -> str:
    body = {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": 4,
            "template": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
            **spec,
        },
    }
    return json.dumps(body)


def workers(kube: Kube, ns: str, name: str) -> dict[str, dict]:
    items = kube.json("get", "pods", "-n", ns, "-l", WORKERS.format(name))["items"]
    return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}


def running(kube: Kube, ns: str, name: str, count: int):
    def probe():
        pods = workers(kube, ns, name)
        ok = len(pods) == count and all(
            p["status"].get("phase") == "Running" for p in pods.values()
        )
        return pods if ok else None

    return wait_for(f"{count} running workers of {name}", probe)


def status(kube: Kube, ns: str, name: str) -> dict:
    return kube.json("get", "dtj", name, "-n", ns).get("status", {})


def uids(pods: dict[str, dict]) -> dict[str, str]:
    return {n: p["metadata"]["uid"] for n, p in pods.items()}


def test_scale_up_and_down_keeps_the_other_workers(kube: Kube, operator, namespace):
    kube.run("apply", "-n", namespace, "-f", "-", input=job("scaled"))
    before = uids(running(kube, namespace, "scaled", 4))
    kube.run("scale", "-n", namespace, "dtj/scaled", "--replicas=8")
    after_up = uids(running(kube, namespace, "scaled", 8))
    assert all(after_up[n] == u for n, u in before.items()), "existing workers untouched"
    kube.run("scale", "-n", namespace, "dtj/scaled", "--replicas=3")
    after_down = uids(running(kube, namespace, "scaled", 3))
    assert sorted(after_down) == ["scaled-worker-0", "scaled-worker-1", "scaled-worker-2"]
    assert all(after_down[n] == before[n] for n in after_down)
    wait_for("status.replicas=3", lambda: status(kube, namespace, "scaled").get("replicas") == 3)
    cm = kube.json("get", "configmap", "scaled-config", "-n", namespace)
    assert json.loads(cm["data"]["config.json"])["replicas"] == 3


def test_deleted_and_drained_workers_are_replaced_as_preemptions(kube: Kube, operator, namespace):
    spot = {
        "name": "spot",
        "nodeSelector": {"pool": "spot"},
        "tolerations": [{"key": "pool", "value": "spot", "effect": "NoSchedule"}],
        "preemptible": True,
    }
    kube.run("apply", "-n", namespace, "-f", "-", input=job("spotty", replicas=2, nodePools=[spot]))
    pods = running(kube, namespace, "spotty", 2)
    assert all(p["spec"]["nodeName"].startswith("spot-") for p in pods.values())
    old = pods["spotty-worker-1"]["metadata"]["uid"]
    kube.run("delete", "pod", "-n", namespace, "spotty-worker-1")
    wait_for(
        "a replacement worker-1",
        lambda: (
            (p := running(kube, namespace, "spotty", 2))
            and p["spotty-worker-1"]["metadata"]["uid"] != old
        ),
    )
    wait_for(
        "1 preemption counted", lambda: status(kube, namespace, "spotty").get("preemptions") == 1
    )

    node = running(kube, namespace, "spotty", 2)["spotty-worker-0"]["spec"]["nodeName"]
    kube.run("drain", node, "--delete-emptydir-data", "--ignore-daemonsets", "--timeout=60s")
    try:
        moved = wait_for(
            "worker-0 rescheduled away from the drained spot node",
            lambda: (
                (p := running(kube, namespace, "spotty", 2))
                and p["spotty-worker-0"]["spec"]["nodeName"] != node
                and p
            ),
        )
        assert moved["spotty-worker-0"]["spec"]["nodeName"].startswith("spot-")
        st = wait_for(
            "2 preemptions",
            lambda: (s := status(kube, namespace, "spotty")).get("preemptions") == 2 and s,
        )
        assert st.get("failures", 0) == 0, "preemptions never spend the failure budget"
    finally:
        kube.run("uncordon", node)

    # A spot node vanishes: the pod garbage collector removes its pods (after
    # its 40 s quarantine) and the worker comes back on another spot node.
    gone = running(kube, namespace, "spotty", 2)["spotty-worker-1"]["spec"]["nodeName"]
    manifest = next(n for n in devcluster.fake_gpu_nodes() if n["metadata"]["name"] == gone)
    kube.run("delete", "node", gone)
    try:
        wait_for(
            "worker-1 back on another spot node",
            lambda: (
                (p := running(kube, namespace, "spotty", 2))
                and p["spotty-worker-1"]["spec"]["nodeName"] not in (gone, "")
                and p["spotty-worker-1"]["spec"]["nodeName"].startswith("spot-")
            ),
            timeout=180,
        )
        st = wait_for(
            "3 preemptions",
            lambda: (s := status(kube, namespace, "spotty")).get("preemptions") == 3 and s,
        )
        assert st.get("failures", 0) == 0
    finally:
        kube.run("apply", "-f", "-", input=json.dumps(manifest))


def test_suspend_deletes_workers_and_resume_brings_them_back(kube: Kube, operator, namespace):
    kube.run("apply", "-n", namespace, "-f", "-", input=job("pausable"))
    running(kube, namespace, "pausable", 4)
    kube.run(
        "patch",
        "dtj",
        "pausable",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":true}}}',
    )
    wait_for("no workers", lambda: workers(kube, namespace, "pausable") == {})
    st = wait_for(
        "phase Suspended",
        lambda: (s := status(kube, namespace, "pausable")).get("phase") == "Suspended" and s,
    )
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "True"
    kube.run(
        "patch",
        "dtj",
        "pausable",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":false}}}',
    )
    running(kube, namespace, "pausable", 4)
    wait_for("phase Running", lambda: status(kube, namespace, "pausable").get("phase") == "Running")


def test_failures_beyond_backoff_limit_fail_the_job(kube: Kube, operator, namespace):
    kube.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("flaky", replicas=2, runPolicy={"backoffLimit": 1}),
    )
    first = running(kube, namespace, "flaky", 2)["flaky-worker-0"]["metadata"]["uid"]
    kube.run(
        "annotate", "pod", "-n", namespace, "flaky-worker-0", "training.dtj.io/simulate-exit-code=3"
    )
    wait_for(
        "worker-0 replaced after its failure",
        lambda: (
            (p := running(kube, namespace, "flaky", 2))
            and p["flaky-worker-0"]["metadata"]["uid"] != first
        ),
    )
    wait_for(
        "one failure counted, the job Running",
        lambda: (
            (s := status(kube, namespace, "flaky")).get("failures") == 1
            and s.get("phase") == "Running"
        ),
    )
    kube.run(
        "annotate", "pod", "-n", namespace, "flaky-worker-1", "training.dtj.io/simulate-exit-code=3"
    )
    st = wait_for(
        "phase Failed",
        lambda: (s := status(kube, namespace, "flaky")).get("phase") == "Failed" and s,
    )
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "exited with code 3" in failed["message"]
    wait_for(
        "running pods cleaned up (cleanPodPolicy Running)",
        lambda: (
            workers(kube, namespace, "flaky") == {}
            or all(
                p["status"].get("phase") != "Running"
                for p in workers(kube, namespace, "flaky").values()
            )
        ),
    )


def test_completion_succeeds_and_ttl_deletes_the_job(kube: Kube, operator, namespace):
    kube.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("done", replicas=2, runPolicy={"ttlSecondsAfterFinished": 3}),
    )
    running(kube, namespace, "done", 2)
    for i in range(2):
        kube.run(
            "annotate",
            "pod",
            "-n",
            namespace,
            f"done-worker-{i}",
            "training.dtj.io/simulate-exit-code=0",
        )
    st = wait_for(
        "phase Succeeded",
        lambda: (s := status(kube, namespace, "done")).get("phase") == "Succeeded" and s,
    )
    assert st.get("completionTime")
    wait_for(
        "the job deleted by its TTL",
        lambda: kube.run("get", "dtj", "done", "-n", namespace, check=False).returncode != 0,
        timeout=120,
    )


def test_deadline_exceeded_fails_the_job(kube: Kube, operator, namespace):
    kube.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("slow", replicas=2, runPolicy={"activeDeadlineSeconds": 3}),
    )
    running(kube, namespace, "slow", 2)
    st = wait_for(
        "phase Failed",
        lambda: (s := status(kube, namespace, "slow")).get("phase") == "Failed" and s,
    )
    assert (
        next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "DeadlineExceeded"
    )
    wait_for("workers cleaned up", lambda: workers(kube, namespace, "slow") == {})


def test_unschedulable_workers_stay_pending_and_min_replicas_starts_training(
    kube: Kube, operator, namespace
):
    pools = [
        {"name": "ondemand", "nodeSelector": {"pool": "ondemand"}, "maxWorkers": 2},
        {"name": "missing", "nodeSelector": {"pool": "does-not-exist"}},
    ]
    kube.run(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=job("partial", replicas=4, minReplicas=2, nodePools=pools),
    )

    def state():
        s = status(kube, namespace, "partial")
        return s if s.get("readyReplicas") == 2 and s.get("pendingReplicas") == 2 else None

    st = wait_for("2 ready, 2 pending", state)
    assert st["phase"] == "Running", "training starts at minReplicas"
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    pods = workers(kube, namespace, "partial")
    on = {p["metadata"]["labels"]["training.dtj.io/pool"]: p for p in pods.values()}
    assert set(on) == {"ondemand", "missing"}
    assert all(
        p["spec"]["nodeName"].startswith("ondemand-")
        for p in pods.values()
        if p["metadata"]["labels"]["training.dtj.io/pool"] == "ondemand"
    )


def test_a_spec_the_api_server_refuses_to_turn_into_pods_fails_naming_the_field(
    kube: Kube, operator, namespace
):
    """The CRD admits any core/v1 VolumeMount; one of an undeclared volume makes every
    pod invalid. The job ends Failed with the API server's sentence, instead of retrying."""
    template = {"volumeMounts": [{"name": "undeclared", "mountPath": "/data"}]}
    kube.run("apply", "-n", namespace, "-f", "-", input=job("badmount", template=template))
    st = wait_for(
        "phase Failed",
        lambda: (s := status(kube, namespace, "badmount")).get("phase") == "Failed" and s,
    )
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec", failed
    assert "volumeMounts" in failed["message"] and "undeclared" in failed["message"], failed
    assert workers(kube, namespace, "badmount") == {}


def holds(what: str, probe, seconds: float = 12.0) -> None:
    """`probe()` stays true for `seconds` (what must not happen, checked throughout)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert probe(), what
        time.sleep(0.5)


def test_a_cordon_evicts_workers_within_the_jobs_budget_and_its_pdbs(
    kube: Kube, operator, namespace
):
    """Issue 21: a cordon deleted every worker of the node at once (DELETE: no
    eviction, PodDisruptionBudgets bypassed, no cap at replicas - minReplicas)."""
    node = "ondemand-1"
    pools = [{"name": "pinned", "nodeSelector": {"kubernetes.io/hostname": node}}]
    spec = job("drained", replicas=3, minReplicas=2, nodePools=pools)
    kube.run("apply", "-n", namespace, "-f", "-", input=spec)
    first = running(kube, namespace, "drained", 3)
    selector = {
        "matchLabels": {"training.dtj.io/job": "drained", "app.kubernetes.io/component": "worker"}
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "hold"},
        "spec": {"maxUnavailable": 0, "selector": selector},
    }
    kube.run("apply", "-n", namespace, "-f", "-", input=json.dumps(pdb))
    wait_for(  # the disruption controller has counted the pods (as before any real drain)
        "the PodDisruptionBudget in force",
        lambda: (
            (st := kube.json("get", "pdb", "hold", "-n", namespace).get("status") or {})
            and st.get("observedGeneration") == 1
            and st.get("currentHealthy") == 3
            and st.get("disruptionsAllowed") == 0
        ),
    )
    uids = {p["metadata"]["uid"] for p in first.values()}

    def untouched() -> bool:
        pods = workers(kube, namespace, "drained")
        return {p["metadata"]["uid"] for p in pods.values()} == uids and not any(
            "training.dtj.io/moved-away" in (p["metadata"].get("annotations") or {})
            for p in pods.values()
        )

    kube.run("cordon", node)
    try:
        wait_for(
            "the operator to defer the move",
            # (counted over every job with workers there)
            lambda: re.search(rf"node {node} is cordoned: \d+ workers wait", operator.read_text()),
        )
        holds("the PodDisruptionBudget keeps every worker where it is", untouched)
        kube.run("delete", "pdb", "hold", "-n", namespace)

        def one_moved():
            pods = workers(kube, namespace, "drained")
            stayed = [p for p in pods.values() if p["metadata"]["uid"] in uids]
            return len(pods) == 3 and len(stayed) == 2 and pods

        wait_for("one worker evicted, its replacement waiting for the node", one_moved)
        # minReplicas 2 of 3: one may be away at a time, and its replacement cannot
        # start (pinned to the cordoned node): the other two stay.
        holds("the others wait for the replacement", lambda: bool(one_moved()))
    finally:
        kube.run("uncordon", node)
    running(kube, namespace, "drained", 3)
    st = wait_for(
        "the move counted",
        lambda: (s := status(kube, namespace, "drained")).get("preemptions") and s,
    )
    assert st["preemptions"] == 1 and "cordoned" in st["lastPreemption"], st
