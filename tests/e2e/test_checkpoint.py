"""A job's checkpoint read back through the operator, on the executing nodes.

The checkpoint directory is a PersistentVolumeClaim (bound to a hostPath volume
of this machine, which every executing node is: it outlives the pods as a
ReadWriteMany volume would). Suspending the job stops every worker (SIGTERM:
each writes its checkpoint as it leaves); resuming it starts new processes that
go on from those checkpoints, at the step and with the optimizer state each
left with, and their loss goes on from where it was instead of starting over.
Then every pod of the job (the coordinator too) is deleted at once: the
replacements resume the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.jobs import job_status, manifest, pods, succeeded
from tests.e2e.kube import Kube, wait_for

pytestmark = pytest.mark.e2e

STEPS = 1000
NAME = "resumable"


def claim(kube: Kube, ns: str, directory: Path) -> None:
    directory.mkdir()
    directory.chmod(0o777)  # the workers run as a non-root user
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{ns}-ckpt"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "hostPath": {"path": str(directory)},
            "claimRef": {"namespace": ns, "name": "ckpt"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "ckpt", "namespace": ns},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": f"{ns}-ckpt",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    kube.run(
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [pv, pvc]}),
    )


def job() -> str:
    return manifest(
        NAME,
        minReplicas=4,
        training={
            "steps": STEPS,
            "evalEvery": 25,
            "checkpoint": {"path": "/ckpt", "everySteps": 100},
        },
        template={
            "env": [{"name": "DTJ_SIMULATE_SAMPLE_SECONDS", "value": "0.0005"}],
            "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}],
            "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
        },
    )


def suspend(kube: Kube, ns: str, value: bool) -> None:
    body = json.dumps({"spec": {"runPolicy": {"suspend": value}}})
    kube.run("patch", "dtj", NAME, "-n", ns, "--type=merge", "-p", body)


def at_step(kube: Kube, ns: str, step: int) -> None:
    wait_for(
        f"the job at step {step}",
        lambda: (job_status(kube, ns, NAME).get("progress") or {}).get("step", 0) >= step,
        timeout=180,
    )


def workers(kube: Kube, ns: str) -> dict[str, dict[str, Any]]:
    return {n: p for n, p in pods(kube, ns, NAME).items() if "-worker-" in n}


def checkpoints(directory: Path) -> dict[int, dict[str, Any]]:
    return {s: torch.load(directory / f"worker-{s}.pt", weights_only=True) for s in range(4)}


def resumed(kube: Kube, ns: str, slot: int) -> tuple[int, float] | None:
    """(the step this worker resumed at, its first reported loss), once it reported."""
    log = kube.run("logs", "-n", ns, f"{NAME}-worker-{slot}", check=False).stdout
    at = re.findall(r"resumed from the checkpoint at step (\d+)", log)
    losses = [json.loads(x)["loss"] for x in log.splitlines() if x.startswith('{"rank"')]
    return (int(at[-1]), losses[0]) if at and losses else None


def test_a_job_resumes_from_its_checkpoint_after_a_suspension_and_after_losing_every_pod(
    kube, local, operator, namespace, tmp_path
):
    directory = tmp_path / "ckpt"
    claim(kube, namespace, directory)
    kube.run("apply", "-n", namespace, "-f", "-", input=job())
    at_step(kube, namespace, 200)
    for event in ("suspend", "delete every pod"):
        before = float(job_status(kube, namespace, NAME)["progress"]["loss"])
        if event == "suspend":
            suspend(kube, namespace, True)
            wait_for("no workers", lambda: workers(kube, namespace) == {}, timeout=120)
            left = checkpoints(directory)
            suspend(kube, namespace, False)
        else:
            # every pod of the job, the coordinator too: its store (the membership, the
            # job's counters) is gone with it
            old = {n: p["metadata"]["uid"] for n, p in pods(kube, namespace, NAME).items()}
            assert f"{NAME}-coordinator" in old
            selector = f"training.dtj.io/job={NAME}"
            kube.run("delete", "pod", "-n", namespace, "-l", selector, "--wait=false")
            wait_for(
                "every pod replaced",
                lambda old=old: (
                    len(now := pods(kube, namespace, NAME)) == len(old)
                    and all(now[n]["metadata"]["uid"] != uid for n, uid in old.items() if n in now)
                ),
                timeout=120,
            )
            left = checkpoints(directory)
        # Each wrote its checkpoint as it left: at a step of its own, not only at everySteps.
        assert all(c["step"] >= 200 and c["optimizer"]["state"] for c in left.values()), {
            s: c["step"] for s, c in left.items()
        }
        back = {
            s: wait_for(f"worker {s} resumed", lambda s=s: resumed(kube, namespace, s), timeout=180)
            for s in range(4)
        }
        for slot, (step, loss) in back.items():
            assert step == left[slot]["step"], (event, slot, step, left[slot]["step"])
            # the loss goes on: near the job's before the event, far below an untrained model's
            assert loss < 1.5 * before + 0.05, (event, slot, loss, before)
        if event == "suspend":
            at_step(kube, namespace, max(c["step"] for c in left.values()) + 100)
    st = succeeded(kube, namespace, NAME)
    assert st["result"]["steps"] == STEPS
    assert st.get("failures", 0) == 0 and st.get("preemptions") == 4, st
