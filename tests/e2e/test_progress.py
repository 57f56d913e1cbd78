"""Progress reaches the job status through the coordinator's path, on a real API server.

The coordinator pod does not run under kwok, so this drives the coordinator's
own reporting loop in-process: a real TCPStore holding worker reports, a real
PATCH to the status subresource with a bearer token, as the coordinator's
service account would make it.
"""

from __future__ import annotations

import json
import ssl
import threading

import pytest
import yaml
from dtj_trainer import coordinator, progress
from dtj_trainer.metrics import Progress

from tests.e2e.kube import Kube, wait_for

pytestmark = pytest.mark.e2e


def test_coordinator_writes_aggregated_progress_to_the_status(crds: Kube, namespace):
    kube = crds
    body = {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": "reported", "namespace": namespace},
        "spec": {"replicas": 2},
    }
    kube.run("apply", "-f", "-", input=json.dumps(body))
    store = coordinator.serve("127.0.0.1", 0)
    for rank, (step, loss) in enumerate([(120, 0.5), (100, 0.25)]):
        p = Progress(rank=rank, step=step, loss=loss, samples_per_second=50.0)
        store.set(f"progress/{rank}", json.dumps(p.__dict__))
    cfg = yaml.safe_load(kube.kubeconfig.read_text())
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    writer = progress.StatusWriter(
        cfg["clusters"][0]["cluster"]["server"],
        cfg["users"][0]["user"]["token"],
        namespace,
        "reported",
        ctx,
    )
    stop = threading.Event()
    loop = threading.Thread(target=coordinator.report_loop, args=(store, 2, writer, stop, 0.2))
    loop.start()
    try:
        st = wait_for(
            "status.progress",
            lambda: (
                kube.json("get", "dtj", "reported", "-n", namespace)
                .get("status", {})
                .get("progress")
            ),
        )
    finally:
        stop.set()
        loop.join()
    assert st["step"] == 100 and st["loss"] == "0.3750" and st["samplesPerSecond"] == "100.0"
    table = kube.run("get", "dtj", "reported", "-n", namespace).stdout.splitlines()
    header = table[0].split()
    row = dict(zip(header[-3:], table[1].split()[-3:], strict=True))  # STEP LOSS AGE
    assert row["STEP"] == "100" and row["LOSS"] == "0.3750", table
