"""Preemption and scaling through the whole stack, on the executing nodes.

A job trains on real worker processes; a worker pod is deleted, its node
drained, or the job scaled, while it trains. The job stays Running, the loss
is counted as a preemption (never a failure), no surviving worker restarts,
the replacement joins the running generation, and the job succeeds.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from typing import Any

import pytest
import yaml
from dtj_devcluster import controlplane

from tests.e2e.jobs import EXECUTING_POOL, job_status, manifest, pods, succeeded
from tests.e2e.kube import ROOT, Kube, new_namespace, wait_for

pytestmark = pytest.mark.e2e

# Modelled compute per sample (~16 ms a step) so a run lasts long enough to disturb.
# It is a sleep: it changes how long a step takes, never what it computes.
SAMPLE_SECONDS = 0.0005


STEPS = 1000  # every job here, disturbed or not: so their accuracies compare


def elastic_job(
    name: str,
    replicas: int = 4,
    sample_seconds: float = SAMPLE_SECONDS,
    algorithm: str = "dpsgd",
    min_replicas: int = 3,
) -> str:
    env = [{"name": "DTJ_SIMULATE_SAMPLE_SECONDS", "value": str(sample_seconds)}]
    # An asynchronous method runs on a job-wide sample budget (the counter a replaced
    # coordinator must get back), as many samples as the synchronous jobs' steps.
    length: dict[str, Any] = (
        {"steps": STEPS}
        if algorithm == "dpsgd"
        else {"steps": None, "budget": {"samples": STEPS * replicas * 32}}
    )
    return manifest(
        name,
        replicas=replicas,
        minReplicas=min_replicas,
        algorithm={"name": algorithm, "topology": "ring"},
        training={**length, "evalEvery": 50},
        template={"env": env},
    )


def worker_pids(local: controlplane.LocalCluster, ns: str) -> dict[str, list[int]]:
    """pod name -> pids of every trainer process started for it (from the node agent's
    start records: they outlive the job, so a check cannot race its end)."""
    out: dict[str, list[int]] = {}
    for r in controlplane.start_records(local.directory, ns):
        if "-worker-" in r["pod"]:
            out.setdefault(r["pod"], []).append(r["pid"])
    return out


def assert_kept_running(local: controlplane.LocalCluster, ns: str, names: list[str]) -> None:
    """Each of these pods ran one process the whole time: nothing restarted it."""
    starts = worker_pids(local, ns)
    for name in names:
        assert len(starts[name]) == 1, f"{name} restarted: {starts[name]}"


def training(kube: Kube, ns: str, name: str, replicas: int, step: int = 100) -> dict[str, Any]:
    def going() -> dict[str, Any] | None:
        st = job_status(kube, ns, name)
        prog = st.get("progress") or {}
        ok = st.get("phase") == "Running" and prog.get("members") == replicas
        return st if ok and prog.get("step", 0) >= step else None

    return wait_for(f"{replicas} members training", going, timeout=180)


@pytest.fixture(scope="module")
def undisturbed(kube: Kube, operator: Any) -> float:
    """Test accuracy of the same job trained with nobody leaving."""
    ns = new_namespace(kube, "e2e")
    try:
        kube.run("apply", "-n", ns, "-f", "-", input=elastic_job("calm"))
        training(kube, ns, "calm", 4)
        return float(finish(kube, ns, "calm")["result"]["testAccuracy"])
    finally:
        kube.run("delete", "namespace", ns, "--wait=false", check=False)


def finish(kube: Kube, ns: str, name: str, baseline: float | None = None) -> dict[str, Any]:
    """Wait for the end, checking the job never left Running meanwhile, and that its
    accuracy is within 1 point of the undisturbed run's (`baseline`)."""
    phases: set[str] = set()

    def done() -> dict[str, Any] | None:
        st = job_status(kube, ns, name)
        phases.add(st.get("phase", ""))
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for("the job to finish", done, timeout=420, every=1.0)
    assert st["phase"] == "Succeeded", st
    assert phases <= {"Running", "Succeeded"}, phases
    # The coordinator writes the result on its next report or as it stops: moments later.
    st = wait_for("status.result", lambda: (s := job_status(kube, ns, name)).get("result") and s)
    assert not st.get("failures"), st
    accuracy = float(st["result"]["testAccuracy"])
    assert accuracy >= 0.95, st["result"]
    if baseline is not None:
        assert abs(accuracy - baseline) <= 0.01, (accuracy, baseline)
    return st


def patch(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = json.dumps({"spec": spec})
    kube.run("patch", "dtj", name, "-n", ns, "--type=merge", "-p", body)


def assert_survivors_untouched(
    kube: Kube, ns: str, name: str, before: dict[str, dict[str, Any]], gone: set[str]
) -> None:
    now = pods(kube, ns, name)
    for pod_name, pod in before.items():
        if pod_name in gone or "-worker-" not in pod_name:
            continue
        assert now[pod_name]["metadata"]["uid"] == pod["metadata"]["uid"], pod_name
        assert now[pod_name]["status"]["containerStatuses"][0].get("restartCount", 0) == 0


def users_script_job(name: str) -> str:
    """examples/lm/job.yaml (the user's own loop, examples/lm/train.py) on the
    executing nodes; the pods see this checkout, as an image would hold the script."""
    body = yaml.safe_load((ROOT / "examples" / "lm" / "job.yaml").read_text())
    body["metadata"]["name"] = name
    spec = body["spec"]
    spec["minReplicas"] = 4  # training waits for a replacement, however long it takes
    spec["training"] = {"steps": 300, "evalEvery": 20}
    spec["nodePools"] = [EXECUTING_POOL]
    spec["template"] |= {
        "workingDir": str(ROOT),
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
    }
    return yaml.safe_dump(body)


def progress_lines(log: str) -> list[dict[str, Any]]:
    """The progress reports a worker printed (JSON lines with a rank and a step)."""
    out = []
    for line in log.splitlines():
        if line.startswith('{"rank"'):
            out.append(json.loads(line))
    return out


def test_a_users_script_loses_a_deleted_and_a_killed_worker_and_their_replacements_join(
    kube, local, operator, namespace
):
    """The user's own training loop through the operator: a deleted pod is a preemption
    (SIGTERM: the model is handed off), a SIGKILLed worker process a failure (its
    model is lost); each replacement joins a newer generation and warm-starts (its
    first reported loss near its peers', not the untrained 5.5), the survivors keep
    their processes, and the job succeeds with a final validation loss within 2% of
    the same job's (same seed) trained undisturbed first."""
    calm = "byte-gpt-calm"
    kube.run("apply", "-n", namespace, "-f", "-", input=users_script_job(calm))
    undisturbed = float(succeeded(kube, namespace, calm)["result"]["metrics"]["val_loss"])
    name = "byte-gpt"
    kube.run("apply", "-n", namespace, "-f", "-", input=users_script_job(name))
    training(kube, namespace, name, 4, step=40)
    before = pods(kube, namespace, name)
    for slot, how in ((1, "deleted"), (2, "killed")):
        pod = f"{name}-worker-{slot}"
        uid = pods(kube, namespace, name)[pod]["metadata"]["uid"]
        if how == "deleted":
            kube.run("delete", "pod", "-n", namespace, pod, "--wait=false")
        else:
            os.kill(worker_pids(local, namespace)[pod][-1], signal.SIGKILL)

        def warm_started(pod: str = pod, uid: str = uid) -> bool:
            # (The job may end soon after: its status can move on past this generation.)
            now = pods(kube, namespace, name).get(pod)
            if now is None or now["metadata"]["uid"] == uid:
                return False
            log = kube.run("logs", "-n", namespace, pod, check=False).stdout
            return "warm start from the members'" in log

        try:
            wait_for(f"the {how} worker's replacement to warm-start", warm_started, timeout=180)
        except AssertionError as e:  # say what the workers saw
            logs = {
                p: kube.run("logs", "-n", namespace, p, check=False).stdout[-1500:]
                for p in pods(kube, namespace, name)
            }
            raise AssertionError(f"{e}\n{job_status(kube, namespace, name)}\n{logs}") from e
    survivors = [f"{name}-worker-{s}" for s in (0, 3)]
    assert_kept_running(local, namespace, survivors)
    st = succeeded(kube, namespace, name)
    assert st["preemptions"] == 1 and st["lastPreemption"] == f"{name}-worker-1: deleted"
    assert st.get("failures") == 1, st  # the SIGKILL: a crash, replaced within backoffLimit
    events = kube.json(
        "get", "events", "-n", namespace, "--field-selector", "reason=WorkerPreempted"
    )
    assert [e["message"] for e in events["items"]] == [f"{name}-worker-1: deleted; replacing it"]
    replaced = {f"{name}-worker-{s}" for s in (1, 2)}
    assert_survivors_untouched(kube, namespace, name, before, replaced)
    peers = [
        progress_lines(kube.run("logs", "-n", namespace, f"{name}-worker-{s}").stdout)
        for s in (0, 3)
    ]
    for slot in (1, 2):
        log = kube.run("logs", "-n", namespace, f"{name}-worker-{slot}").stdout
        warm = re.findall(r"warm start from the members' .* at step (\d+)", log)
        assert warm and int(warm[-1]) >= 40, log[-2000:]
        first = progress_lines(log)[0]  # the replacement's first report
        same = [r["metrics"]["loss"] for p in peers for r in p if r["step"] == first["step"]]
        assert same, (first, slot)
        # Nearer its peers' than the untrained ln(256) (a cold start); its first report
        # may cover only the rounds right after the join (3.29 against 2.44, under load).
        peers_loss = sum(same) / len(same)
        assert first["metrics"]["loss"] < (peers_loss + math.log(256)) / 2, (first, same)
    metrics = st["result"]["metrics"]
    assert st["result"]["workers"] == 4 and "testAccuracy" not in st["result"]
    val_loss = float(metrics["val_loss"])
    assert val_loss == pytest.approx(undisturbed, rel=0.02), (val_loss, undisturbed)
    assert val_loss < 3.0, metrics  # trained: a byte model starts at ln 256 = 5.55
    assert float(metrics["perplexity"]) == pytest.approx(math.exp(val_loss), rel=0.01)


DISRUPT = {
    # kubectl drain: cordon, then evict (here only the workers).
    "drain": (
        [
            "drain",
            "process-1",
            "--pod-selector=app.kubernetes.io/component=worker",
            "--delete-emptydir-data",
            "--force",
            "--timeout=120s",
        ],
        ["uncordon", "process-1"],
    ),
    # The cluster autoscaler's scale-down taint: the operator moves the workers itself.
    "autoscaler-taint": (
        ["taint", "node", "process-1", "ToBeDeletedByClusterAutoscaler=1:NoSchedule"],
        ["taint", "node", "process-1", "ToBeDeletedByClusterAutoscaler-"],
    ),
}


@pytest.mark.parametrize("how", list(DISRUPT))
def test_a_disrupted_node_loses_its_workers_as_preemptions(
    kube, local, operator, namespace, how, undisturbed
):
    name = f"moved-{how.split('-')[0]}"
    # minReplicas 4: training waits until the moved workers run and join.
    kube.run("apply", "-n", namespace, "-f", "-", input=elastic_job(name, min_replicas=4))
    training(kube, namespace, name, 4)
    before = pods(kube, namespace, name)
    victims = {
        n for n, p in before.items() if "-worker-" in n and p["spec"]["nodeName"] == "process-1"
    }
    assert victims, "the scheduler put no worker on process-1"
    disrupt, restore = DISRUPT[how]
    try:
        kube.run(*disrupt)
        wait_for(
            "the workers to be replaced on the other node",
            lambda: (
                (p := pods(kube, namespace, name))
                and all(n in p for n in victims)
                and all(
                    p[n]["spec"].get("nodeName") == "process-0"
                    and p[n]["status"].get("phase") == "Running"
                    for n in victims
                )
            ),
            timeout=180,
        )
        st = finish(kube, namespace, name, undisturbed)
        assert st["preemptions"] == len(victims)
        # A drain cordons, then evicts: the operator may move the workers first.
        why = {"drain": ("evicted (a drain", "is cordoned"), "autoscaler-taint": ("autoscaler",)}
        assert any(w in st["lastPreemption"] for w in why[how]), st["lastPreemption"]
        assert_survivors_untouched(kube, namespace, name, before, victims)
    finally:
        kube.run(*restore)
    if how == "autoscaler-taint":
        events = kube.json(
            "get", "events", "-n", namespace, "--field-selector", "reason=WorkerMoved"
        )
        assert any("cluster autoscaler" in e["message"] for e in events["items"]), events


def test_scaling_up_and_down_while_training(kube, local, operator, namespace, undisturbed):
    # Two rounds of pods starting and stopping must land mid-run: slower steps.
    slower = elastic_job("scaled", sample_seconds=3 * SAMPLE_SECONDS)
    kube.run("apply", "-n", namespace, "-f", "-", input=slower)
    training(kube, namespace, "scaled", 4)
    before = pods(kube, namespace, "scaled")
    kube.run("scale", "dtj/scaled", "-n", namespace, "--replicas=6")
    # Held until the new workers join (however long they take to start), then let go.
    patch(kube, namespace, "scaled", {"minReplicas": 6})
    training(kube, namespace, "scaled", 6)
    patch(kube, namespace, "scaled", {"minReplicas": 3})
    kube.run("scale", "dtj/scaled", "-n", namespace, "--replicas=3")
    training(kube, namespace, "scaled", 3)
    assert_kept_running(local, namespace, [f"scaled-worker-{slot}" for slot in range(3)])
    st = finish(kube, namespace, "scaled", undisturbed)
    assert not st.get("preemptions"), "a scale-down is not a preemption"
    assert st["result"]["workers"] == 3
    assert_survivors_untouched(kube, namespace, "scaled", before, {"scaled-worker-3"})


@pytest.mark.parametrize(
    ("how", "algorithm"), [("deleted", "dpsgd"), ("sigkill", "dpsgd"), ("sigkill", "gosgd")]
)
def test_the_coordinator_is_replaced_and_the_workers_stay(
    kube, local, operator, namespace, undisturbed, how, algorithm
):
    """Deleted, or its process SIGKILLed (a crash or an OOM kill: the pod ends Failed):
    a new coordinator comes, the workers register with it and keep their processes,
    and the job succeeds with no failure counted (issue 18, finding 10), also an
    asynchronous job on a sample budget (finding 6)."""
    name = f"recoord-{how}-{algorithm}"
    job = elastic_job(name, algorithm=algorithm)
    kube.run("apply", "-n", namespace, "-f", "-", input=job)
    training(kube, namespace, name, 4)
    before = pods(kube, namespace, name)
    gen = job_status(kube, namespace, name)["progress"]["generation"]
    old = before[f"{name}-coordinator"]["metadata"]["uid"]
    if how == "deleted":
        kube.run("delete", "pod", "-n", namespace, f"{name}-coordinator", "--wait=false")
    else:
        coordinator = [
            r["pid"]
            for r in controlplane.start_records(local.directory, namespace)
            if r["pod"] == f"{name}-coordinator"
        ]
        os.kill(coordinator[-1], signal.SIGKILL)
    wait_for(
        "a new coordinator",
        lambda: (
            (c := pods(kube, namespace, name).get(f"{name}-coordinator"))
            and c["metadata"]["uid"] != old
            and c["status"].get("phase") == "Running"
        ),
        timeout=120,
    )
    try:
        wait_for(
            "the workers registered with it, in a newer generation",
            lambda: (
                (p := job_status(kube, namespace, name).get("progress") or {})
                and p.get("members") == 4
                and p.get("generation", -1) > gen
            ),
            timeout=120,
        )
    except AssertionError as e:  # say what the coordinator and a worker saw
        logs = {
            pod: kube.run("logs", "-n", namespace, pod, check=False).stdout[-3000:]
            for pod in (f"{name}-coordinator", f"{name}-worker-0")
        }
        raise AssertionError(f"{e}\n{logs}") from e
    sync = algorithm == "dpsgd"
    st = finish(kube, namespace, name, undisturbed if sync else None)
    assert not st.get("preemptions"), "losing the coordinator is not a worker preemption"
    assert_kept_running(local, namespace, [f"{name}-worker-{s}" for s in range(4)])
    # (That the budget is not counted again is checked exactly where every worker's
    # rounds are known: tests/trainer/test_coordinator_outage.py and the matrix.)


def test_a_deleted_node_takes_its_workers_and_they_come_back_elsewhere(
    kube, local, operator, namespace, undisturbed
):
    kube.run("apply", "-n", namespace, "-f", "-", input=elastic_job("nodegone"))
    training(kube, namespace, "nodegone", 4)
    before = pods(kube, namespace, "nodegone")
    victims = {
        n for n, p in before.items() if "-worker-" in n and p["spec"]["nodeName"] == "process-1"
    }
    assert victims, "the scheduler put no worker on process-1"
    try:
        kube.run("delete", "node", "process-1", "--wait=false")
        wait_for(
            "the lost workers counted as preemptions",
            lambda: job_status(kube, namespace, "nodegone").get("preemptions") == len(victims),
            timeout=180,
        )
        st = finish(kube, namespace, "nodegone", undisturbed)
        assert st["preemptions"] == len(victims)
        assert "lost with its node" in st["lastPreemption"], st["lastPreemption"]
        assert_survivors_untouched(kube, namespace, "nodegone", before, victims)
    finally:
        # The node agent registers a replacement machine under a new name.
        wait_for(
            "a replacement executing node",
            lambda: len(kube.json("get", "nodes", "-l", "dtj.io/runtime=process")["items"]) == 2,
            timeout=120,
        )
        kube.run("wait", "--for=condition=Ready", "node", "-l", "dtj.io/runtime=process")


def test_a_job_without_min_replicas_scaled_down_trains_on_and_succeeds(
    kube, local, operator, namespace
):
    """Issue 18, finding 7: minReplicas defaults to replicas, and the coordinator read it
    once: `kubectl scale` 4 -> 2 of the quickstart left it paused for ever. The
    coordinator follows the spec: the two left train on and the job succeeds."""
    env = [{"name": "DTJ_SIMULATE_SAMPLE_SECONDS", "value": str(SAMPLE_SECONDS)}]
    body = manifest("shrink", training={"steps": STEPS, "evalEvery": 50}, template={"env": env})
    assert "minReplicas" not in body
    kube.run("apply", "-n", namespace, "-f", "-", input=body)
    training(kube, namespace, "shrink", 4)
    kube.run("scale", "dtj/shrink", "-n", namespace, "--replicas=2")
    wait_for(
        "2 members training, not paused",
        lambda: (
            (p := job_status(kube, namespace, "shrink").get("progress") or {})
            and p.get("members") == 2
            and p.get("paused") is False
        ),
        timeout=180,
    )
    st = finish(kube, namespace, "shrink")
    assert st["result"]["workers"] == 2
    assert_kept_running(local, namespace, ["shrink-worker-0", "shrink-worker-1"])
