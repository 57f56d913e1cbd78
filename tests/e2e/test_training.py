"""Jobs applied with kubectl really train: operator pods run the trainer on executing nodes.

The local cluster's executing nodes (dtj_devcluster.nodeagent) run each pod's
container command as a local process with the pod's env, volumes, loopback
pod IP and /etc/hosts; the control plane, scheduler, operator and trainer are
the real ones. These tests need those nodes, so they run on the local cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import yaml
from dtj_devcluster import controlplane

from tests.e2e.jobs import job_status, manifest, pods
from tests.e2e.kube import Kube, wait_for

pytestmark = pytest.mark.e2e


def train_to_the_end(
    kube: Kube, ns: str, name: str, body: str, on_status: Any = None
) -> dict[str, Any]:
    """Apply, watch the pods run and the progress move, return the final status
    (`on_status` sees each status polled on the way)."""
    kube.run("apply", "-n", ns, "-f", "-", input=body)
    replicas = yaml.safe_load(body)["spec"]["replicas"]

    def all_running() -> dict[str, dict[str, Any]] | None:
        ps = pods(kube, ns, name)
        running = [p for p in ps.values() if p["status"].get("phase") == "Running"]
        return ps if len(running) == replicas + 1 else None  # workers + coordinator

    running = wait_for("workers and coordinator Running", all_running, timeout=120)
    for p in running.values():
        assert p["spec"]["nodeName"].startswith("process-"), p["metadata"]["name"]
        assert p["status"]["podIP"].startswith("127."), p["status"]["podIP"]
    seen: dict[int, str] = {}

    def finished() -> dict[str, Any] | None:
        st = job_status(kube, ns, name)
        if on_status is not None:
            on_status(st)
        prog = st.get("progress") or {}
        if prog.get("step") is not None:
            seen[int(prog["step"])] = prog["loss"]
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for("the job to finish", finished, timeout=420, every=1.0)
    assert st["phase"] == "Succeeded", (st, kube.run("get", "pods", "-n", ns, "-o", "wide").stdout)
    assert len(seen) >= 2, f"status.progress moved only through steps {sorted(seen)}"
    assert all(float(loss) > 0 for loss in seen.values())
    # The coordinator writes the result on its next report or as it stops: moments later.
    return wait_for("status.result", lambda: (s := job_status(kube, ns, name)).get("result") and s)


def assert_trained(kube: Kube, local: controlplane.LocalCluster, ns: str, name: str, st: dict):
    assert float(st["result"]["testAccuracy"]) >= 0.9, st["result"]
    assert not st.get("failures"), st
    workers = {n: p for n, p in pods(kube, ns, name).items() if "-worker-" in n}
    assert len(workers) == st["result"]["workers"]
    for p in workers.values():
        term = p["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 0, (p["metadata"]["name"], term)
    # The worker's own log, through the API server and the node's log endpoint.
    logs = kube.run("logs", "-n", ns, f"{name}-worker-0").stdout
    assert '"step":' in logs and "averaged_accuracy" in logs
    # The progress and result came through the coordinator's own service account.
    coordinator = f"system:serviceaccount:{ns}:{name}-coordinator"
    writers = {
        e["user"]["username"]
        for e in map(json.loads, local.audit_log.read_text().splitlines())
        if (e.get("objectRef") or {}).get("name") == name
        and (e.get("objectRef") or {}).get("namespace") == ns
        and e["verb"] == "patch"
        and e.get("responseStatus", {}).get("code") == 200
    }
    assert coordinator in writers, writers
    can = kube.run("auth", "can-i", "patch", "pods", "-n", ns, f"--as={coordinator}", check=False)
    assert can.stdout.strip() == "no"


# Modelled compute (~16 ms a step): long enough for the coordinator's 5 s reports to
# show the progress moving.
SLOW = {"env": [{"name": "DTJ_SIMULATE_SAMPLE_SECONDS", "value": "0.0005"}]}
LONGER = {"steps": 500, "evalEvery": 50}


def test_a_dpsgd_job_applied_with_kubectl_trains_to_90_percent(kube, local, operator, namespace):
    body = manifest(
        "ring",
        replicas=4,
        algorithm={"name": "dpsgd", "topology": "ring"},
        training=LONGER,
        template=SLOW,
    )
    st = train_to_the_end(kube, namespace, "ring", body)
    assert_trained(kube, local, namespace, "ring", st)


METHODS = ("allreduce", "dpsgd", "gosgd", "dasgd", "teleportation")


def test_every_method_trains_with_its_defaults_through_the_operator(
    kube, local, operator, namespace
):
    """Issue 18, finding 0: teleportation's default (activeNodes auto) crashed every real
    worker, and only the simulator had run it. Each method with nothing but its name set
    (and momentum 0 for teleportation, which refuses it), all five jobs at once."""
    for method in METHODS:
        momentum = 0.0 if method == "teleportation" else 0.9
        body = manifest(
            f"default-{method}",
            replicas=2,
            algorithm={"name": method, "topology": None},
            optimizer={"momentum": momentum},
        )
        kube.run("apply", "-n", namespace, "-f", "-", input=body)
    for method in METHODS:
        name = f"default-{method}"
        wait_for(
            f"{name} to finish",
            lambda n=name: job_status(kube, namespace, n).get("phase") in ("Succeeded", "Failed"),
            timeout=420,
            every=1.0,
        )
        st = wait_for(
            f"{name}'s result",
            lambda n=name: (s := job_status(kube, namespace, n)).get("result") and s,
        )
        assert st["phase"] == "Succeeded" and not st.get("failures"), st
        assert float(st["result"]["testAccuracy"]) >= 0.85, (method, st["result"])


def test_a_worker_that_fails_on_its_own_says_why(kube, local, operator, namespace):
    body = manifest(
        "badmodel",
        replicas=2,
        training={"model": "nosuch_pkg.models:build"},
        runPolicy={"backoffLimit": 0},
    )
    kube.run("apply", "-n", namespace, "-f", "-", input=body)
    st = wait_for(
        "the job to fail",
        lambda: (s := job_status(kube, namespace, "badmodel")).get("phase") == "Failed" and s,
        timeout=180,
    )
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert st["failures"] >= 1 and not st.get("preemptions")
    assert "exited with code 2" in st["lastFailure"], st["lastFailure"]
    assert "cannot import module 'nosuch_pkg.models'" in st["lastFailure"], st["lastFailure"]
    events = kube.json("get", "events", "-n", namespace, "--field-selector", "reason=WorkerFailed")[
        "items"
    ]
    assert any("nosuch_pkg" in e["message"] for e in events), events
    # The failed pod named in lastFailure is kept, so its log can still be read (the
    # other worker may have been stopped by the job's end before it failed on its own).
    culprit = st["lastFailure"].split()[0]
    assert pods(kube, namespace, "badmodel")[culprit]["status"]["phase"] == "Failed"
    logs = kube.run("logs", "-n", namespace, culprit).stdout
    assert "dtj-trainer: error:" in logs and "nosuch_pkg" in logs


def test_deleting_the_job_stops_every_process_it_started(kube, local, operator, namespace):
    body = manifest("forever", replicas=2, training={"steps": 1_000_000, "evalEvery": 20})
    kube.run("apply", "-n", namespace, "-f", "-", input=body)
    wait_for(
        "training progress",
        lambda: (job_status(kube, namespace, "forever").get("progress") or {}).get("step"),
        timeout=120,
    )
    assert len(controlplane.leftover_processes(local.directory, namespace)) >= 3
    kube.run("delete", "dtj", "forever", "-n", namespace, "--wait=false")
    wait_for(
        "every process of the job to end",
        lambda: not controlplane.leftover_processes(local.directory, namespace),
        timeout=60,
    )
    wait_for("the pods to be gone", lambda: not pods(kube, namespace, "forever"), timeout=60)


def test_cluster_down_leaves_no_process_and_no_state(tmp_path):
    """A cluster of its own: a pod that even ignores SIGTERM is gone after `down`."""
    directory = tmp_path / "own"
    cluster = controlplane.LocalCluster(directory, controlplane.build())
    cluster.start(fake_nodes=False, process_nodes=1)
    try:
        pid_file = json.loads(cluster.pidfile.read_text())
        stubborn = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "stubborn", "namespace": "default"},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "c",
                        "image": "local",
                        "command": [
                            "python",
                            "-c",
                            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                            "print('up', flush=True); time.sleep(600)",
                        ],
                    }
                ],
            },
        }
        wait_for(
            "the default service account",
            lambda: cluster.kubectl("get", "sa", "default", check=False).returncode == 0,
        )
        cluster.kubectl("apply", "-f", "-", input=json.dumps(stubborn))
        wait_for(
            "the pod's process",
            lambda: controlplane.leftover_processes(directory, "default"),
            timeout=60,
        )
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "dtj_devcluster.cli", "down", "--dir", str(directory)],
            capture_output=True,
            text=True,
        )
    assert down.returncode == 0, down.stderr
    assert controlplane.leftover_processes(directory) == []
    for name, pid in pid_file.items():
        assert not _alive(pid), f"{name} (pid {pid}) survived"
    assert not directory.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_budgeted_job_with_dynamic_batching_reports_its_plan(kube, local, operator, namespace):
    """training.budget and batching.dynamic through the whole stack: the job ends when the
    workers together have trained on the budget, and the status shows each one's batch."""
    budget = 4 * 32 * 400  # ~30 s of training: several progress reports (one per ~5 s)
    body = manifest(
        "planned",
        replicas=4,
        algorithm={"name": "allreduce"},
        batching={"perWorker": 32, "dynamic": True},
        training={"steps": None, "budget": {"samples": budget}, "evalEvery": 20},
        template=SLOW,
    )
    seen_workers: list[list[dict[str, Any]]] = []

    def progress(st: dict[str, Any]) -> None:
        prog = st.get("progress") or {}
        if prog.get("workers") and prog.get("samples"):
            seen_workers.append(prog["workers"])

    st = train_to_the_end(kube, namespace, "planned", body, on_status=progress)
    progress(st)
    assert seen_workers, "status.progress never showed the batch plan"
    assert_trained(kube, local, namespace, "planned", st)
    plan = seen_workers[-1]
    assert sorted(w["slot"] for w in plan) == [0, 1, 2, 3]
    assert sum(w["batch"] for w in plan) == 128  # perWorker x workers, however it is split
    assert all(float(w["computeSamplesPerSecond"]) > 0 for w in plan)
    # Each worker ran the rounds the budget allows: budget / 128 samples a round.
    assert budget // 128 <= st["result"]["steps"] <= budget // 128 + 1, st["result"]
