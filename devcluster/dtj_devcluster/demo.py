"""`make demo-cluster`: a job applied with kubectl trains on executing nodes.

Starts the local cluster (executing nodes only), installs the CRD, runs the
operator, `kubectl apply`s the manifest, prints the job as `kubectl get dtj
-w` would whenever it changes, then the final accuracy from the job's status,
and cleans everything up, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import controlplane

QUICKSTART = controlplane.ROOT / "examples" / "quickstart.yaml"
CRDS = controlplane.ROOT / "crds"


def row(job: dict[str, Any]) -> str:
    """One `kubectl get dtj`-style line of the job's status."""
    st = job.get("status") or {}
    prog = st.get("progress") or {}
    return (
        f"{st.get('phase', 'Pending'):<10} ready {st.get('readyReplicas', 0)}/"
        f"{job['spec'].get('replicas')}  step {prog.get('step', '-'):>5}  "
        f"loss {prog.get('loss', '-'):>7}  preemptions {st.get('preemptions', 0)}  "
        f"failures {st.get('failures', 0)}"
    )


def run(manifest: Path, *, timeout: float = 600.0) -> int:
    body = yaml.safe_load(manifest.read_text())
    name = body["metadata"]["name"]
    with tempfile.TemporaryDirectory(prefix="dtj-demo-") as tmp:
        cluster = controlplane.LocalCluster(Path(tmp) / "cluster", controlplane.build())
        print("starting the local cluster (2 executing nodes) ...", flush=True)
        cluster.start(fake_nodes=False)
        operator = None
        log = Path(tmp) / "operator.log"
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
            cluster.wait_established("decentralizedtrainingjobs.training.dtj.io")
            from dtj_operator.cli import operator_command

            with open(log, "wb") as out:
                env = {"KUBECONFIG": str(cluster.kubeconfig), "PATH": "/usr/bin:/bin"}
                operator = subprocess.Popen(
                    operator_command("default"), stdout=out, stderr=subprocess.STDOUT, env=env
                )
            print(f"operator running (log {log}); kubectl apply -f {manifest}", flush=True)
            cluster.kubectl("apply", "-f", str(manifest))
            return _follow(cluster, name, timeout)
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(timeout=30)
            print("cleaning up: stopping the cluster and every process it started", flush=True)
            cluster.stop()


def _follow(cluster: controlplane.LocalCluster, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last = ""
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", "dtj", name, "-o", "json", check=False)
        if out.returncode == 0:
            job = json.loads(out.stdout)
            line = row(job)
            if line != last:
                print(f"dtj/{name}  {line}", flush=True)
                last = line
            st = job.get("status") or {}
            # The coordinator writes the result moments after the workers finish.
            if st.get("phase") == "Failed" or (st.get("phase") == "Succeeded" and st.get("result")):
                break
        time.sleep(1)
    st = job.get("status") or {}
    result = st.get("result") or {}
    if st.get("lastFailure"):
        print(f"last worker failure: {st['lastFailure']}", file=sys.stderr)
    if st.get("phase") != "Succeeded":
        cond: dict[str, Any] = next(
            (c for c in st.get("conditions", []) if c["type"] == "Failed"), {}
        )
        print(f"job did not succeed: {st.get('phase')} {cond.get('message', '')}", file=sys.stderr)
        pods = cluster.kubectl("get", "pods", "-o", "wide", check=False).stdout
        print(pods, file=sys.stderr)
        return 1
    print(
        f"Result: test accuracy {100 * float(result.get('testAccuracy', 'nan')):.1f}% "
        f"(averaged model; workers {result.get('workerAccuracy', '?')}), from the job's "
        f"status, after {(st.get('progress') or {}).get('step', '?')} steps",
        flush=True,
    )
    return 0
