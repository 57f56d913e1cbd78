"""The operator SIGKILLed at 20 random points while jobs are created, scaled,
preempted and deleted: after the last restart exactly the desired pods exist,
every preemption injected is counted once, and nothing is orphaned."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.kube import Kube, new_namespace, start_operator, wait_for

pytestmark = pytest.mark.e2e
KILLS = 20
JOB = "training.dtj.io/job"


class Operator:
    """One operator process at a time; `kill_and_restart` is a crash at a random point."""

    def __init__(self, kube: Kube, namespace: str, log: Path) -> None:
        self.kube, self.namespace, self.log = kube, namespace, open(log, "ab")  # noqa: SIM115
        self.proc = start_operator(kube, namespace, self.log)
        self.lock = threading.Lock()

    def kill_and_restart(self) -> None:
        with self.lock:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = start_operator(self.kube, self.namespace, self.log)

    def stop(self) -> None:
        with self.lock:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def job(name: str, namespace: str, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "training.dtj.io/v1alpha1",
            "kind": "DecentralizedTrainingJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
        }
    )


def live_workers(kube: Kube, namespace: str, name: str) -> dict[str, dict]:
    pods = kube.json("get", "pods", "-n", namespace, "-l", f"{JOB}={name}")["items"]
    return {
        p["metadata"]["name"]: p
        for p in pods
        if "-worker-" in p["metadata"]["name"] and not p["metadata"].get("deletionTimestamp")
    }


def preempt(kube: Kube, namespace: str, name: str) -> None:
    """Delete one live worker of slot 0 or 1 (slots no scale-down in the script removes)."""
    victim = wait_for(
        f"a live low-slot worker of {name}",
        lambda: next(
            (n for n in sorted(live_workers(kube, namespace, name)) if n[-1] in "01"), None
        ),
        timeout=120,
    )
    kube.run("delete", "pod", victim, "-n", namespace, "--wait=false")


def test_operator_killed_at_20_random_points_converges_and_counts_exactly(
    crds: Kube, tmp_path: Path
):
    kube = crds
    ns = new_namespace(kube, "faults")
    rng = random.Random(20)
    op = Operator(kube, ns, tmp_path / "operator.log")
    done = threading.Event()

    def killer() -> None:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 2.5))
            op.kill_and_restart()
        done.set()

    preempted = {"a": 0, "b": 0, "d": 0}

    def hit(name: str) -> None:
        preempt(kube, ns, name)
        preempted[name] += 1

    script = [
        lambda: [kube.run("apply", "-f", "-", input=job(n, ns, 3)) for n in "abc"],
        lambda: hit("a"),
        lambda: kube.run("scale", "dtj/a", "-n", ns, "--replicas=5"),
        lambda: hit("b"),
        lambda: kube.run("delete", "dtj", "c", "-n", ns, "--wait=false"),
        lambda: kube.run("apply", "-f", "-", input=job("d", ns, 2)),
        lambda: hit("a"),
        lambda: kube.run("scale", "dtj/b", "-n", ns, "--replicas=2"),
        lambda: hit("d"),
        lambda: hit("b"),
        lambda: kube.run("scale", "dtj/a", "-n", ns, "--replicas=4"),
        lambda: hit("a"),
    ]
    thread = threading.Thread(target=killer, daemon=True)
    try:
        thread.start()
        for step in script:
            step()
            time.sleep(rng.uniform(0.2, 1.5))
        assert done.wait(timeout=300), "the operator was not killed 20 times"
        want = {"a": 4, "b": 2, "d": 2}

        def converged() -> bool:
            pods = kube.json("get", "pods", "-n", ns)["items"]
            names = sorted(p["metadata"]["name"] for p in pods)
            expected = sorted(
                [f"{j}-coordinator" for j in want]
                + [f"{j}-worker-{i}" for j, n in want.items() for i in range(n)]
            )
            if names != expected or any(p["metadata"].get("deletionTimestamp") for p in pods):
                return False
            if kube.json("get", "configmaps", "-n", ns, "-l", f"{JOB}=c")["items"]:
                return False  # the deleted job's children are collected
            jobs = {j["metadata"]["name"]: j for j in kube.json("get", "dtj", "-n", ns)["items"]}
            return set(jobs) == set(want) and all(
                (jobs[j].get("status") or {}).get("preemptions", 0) == preempted[j] for j in want
            )

        wait_for("exactly the desired pods and counts", converged, timeout=180)
        jobs = {j["metadata"]["name"]: j for j in kube.json("get", "dtj", "-n", ns)["items"]}
        pods = kube.json("get", "pods", "-n", ns)["items"]
        for p in pods:  # every pod owned by the job of its label, no orphan, none left of c
            owner = p["metadata"]["ownerReferences"][0]
            assert owner["uid"] == jobs[p["metadata"]["labels"][JOB]]["metadata"]["uid"]
        for name, j in jobs.items():
            st = j["status"]
            assert st.get("preemptions", 0) == preempted[name], (name, st, preempted)
            assert st.get("failures", 0) == 0, (name, st)
    finally:
        op.stop()
        kube.run("delete", "namespace", ns, "--wait=false", check=False)
