"""Two operator replicas at once (what the chart runs): only the Lease holder acts;
losing it hands over to the other, and nothing is counted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dtj_devcluster.controlplane import free_port

from tests.e2e.kube import ROOT, Kube, new_namespace, running_pods, wait_for

pytestmark = pytest.mark.e2e
WORKERS = "training.dtj.io/job=ha,app.kubernetes.io/component=worker"


def replica(
    kube: Kube, namespace: str, name: str, log: Path, metrics_port: int
) -> subprocess.Popen[bytes]:
    """`dtj operator --leader-elect` as the chart runs it, as pod `name`; in its own
    process group, so killing the group is losing the pod (kopf child included)."""
    cmd = [sys.executable, "-m", "dtj_operator.cli", "operator", f"--namespace={namespace}"]
    cmd += ["--leader-elect", f"--lease-namespace={namespace}"]
    env = {
        **kube.env,
        "POD_NAME": name,
        "DTJ_OPERATOR_METRICS_PORT": str(metrics_port),
        "DTJ_OPERATOR_METRICS_ADDR": "127.0.0.1",
    }
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )


def holder(kube: Kube, namespace: str) -> str | None:
    got = kube.run("get", "lease", "dtj-operator", "-n", namespace, "-o", "json", check=False)
    if got.returncode != 0:
        return None
    return json.loads(got.stdout)["spec"].get("holderIdentity")


def ready_workers(kube: Kube, namespace: str) -> list[dict] | None:
    return running_pods(kube, namespace, WORKERS, 4)


def test_only_the_leader_acts_and_a_follower_takes_over(crds: Kube, tmp_path: Path):
    kube = crds
    ns = new_namespace(kube, "ha")
    logs = {n: tmp_path / f"{n}.log" for n in ("op-a", "op-b")}
    ports = {n: free_port() for n in logs}
    procs = {"op-a": replica(kube, ns, "op-a", logs["op-a"], ports["op-a"])}
    try:
        wait_for("op-a to hold the lease", lambda: holder(kube, ns) == "op-a")
        procs["op-b"] = replica(kube, ns, "op-b", logs["op-b"], ports["op-b"])
        wait_for("op-b waiting", lambda: "op-b waits for the lease" in logs["op-b"].read_text())
        body = {
            "apiVersion": "training.dtj.io/v1alpha1",
            "kind": "DecentralizedTrainingJob",
            "metadata": {"name": "ha", "namespace": ns},
            "spec": {"replicas": 4},
        }
        kube.run("apply", "-f", "-", input=json.dumps(body))
        pods = wait_for("4 running workers", lambda: ready_workers(kube, ns))
        assert "created Pod" in logs["op-a"].read_text()
        assert "leads" not in logs["op-b"].read_text(), "the follower acted"
        assert procs["op-b"].poll() is None

        os.killpg(procs["op-a"].pid, signal.SIGKILL)  # the leader's pod is lost
        procs["op-a"].wait()
        wait_for("op-b to take the lease over", lambda: holder(kube, ns) == "op-b", timeout=60)
        victim = pods[0]["metadata"]
        kube.run("delete", "pod", victim["name"], "-n", ns, "--wait=false")

        def replaced() -> list[dict] | None:
            now = ready_workers(kube, ns)
            return now if now and victim["uid"] not in {p["metadata"]["uid"] for p in now} else None

        wait_for("the new leader to replace the deleted worker", replaced, timeout=90)
        status = kube.json("get", "dtj", "ha", "-n", ns)["status"]
        # Exactly once, even when the deletion lands as the new leader starts and its
        # events are missed: the tracking finalizer holds the pod until it is counted.
        assert status.get("preemptions") == 1, status
        assert not status.get("failures"), status
        assert len(kube.json("get", "pods", "-n", ns, "-l", WORKERS)["items"]) == 4

        procs["op-b"].send_signal(signal.SIGTERM)  # a rollout: stop, hand the lease back
        assert procs["op-b"].wait(timeout=30) == 0
        assert holder(kube, ns) is None, "the lease was not handed back"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kube.run("delete", "namespace", ns, "--wait=false", check=False)
