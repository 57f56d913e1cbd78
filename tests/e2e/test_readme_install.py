"""The README's install section, run as written against a fresh local cluster.

The commands are read from the README's first bash block under "Running the
operator" and run by a shell with kubectl and the pinned helm on PATH, from the
repository root; nothing is added. The cluster has executing nodes only (as
`make demo-cluster`), so the chart's operator Deployment (2 replicas, leader
election, the chart's service account and RBAC) runs as real pods and the
quickstart job trains on real worker processes to Succeeded. Then
`helm uninstall` and deleting the job leave nothing behind.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from dtj_devcluster import controlplane as devcluster

from tests.e2e.jobs import succeeded
from tests.e2e.kube import ROOT, Kube, wait_for

pytestmark = pytest.mark.e2e


def install_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the operator", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under 'Running the operator'"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_install_commands_are_the_ones_users_expect():
    commands = install_commands()
    assert any(c.startswith("helm install dtj helm/dtj-operator") for c in commands), commands
    assert "kubectl apply -f examples/quickstart.yaml" in commands, commands


def test_the_readme_install_section_works_as_written(helm: str, tmp_path: Path):
    cluster = devcluster.LocalCluster(tmp_path / "cluster", devcluster.build())
    cluster.start(fake_nodes=False)
    kube = Kube(cluster.kubeconfig, str(cluster.bin / "kubectl"), cluster)
    path = f"{cluster.bin}:{Path(helm).parent}:{os.environ['PATH']}"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": path}
    try:
        for command in install_commands():
            out = subprocess.run(
                command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True
            )
            assert out.returncode == 0, f"README command failed: {command}\n{out.stderr}"

        def operators() -> list[dict]:
            pods = kube.json("get", "pods", "-l", "app.kubernetes.io/name=dtj-operator")["items"]
            return [p for p in pods if p["status"].get("phase") == "Running"]

        running = wait_for("both operator replicas running", lambda: len(operators()) == 2)
        assert running
        holder = wait_for(
            "a replica holding the Lease",
            # named after the release (dtj + the chart's name), as its service account
            lambda: kube.json("get", "lease", "dtj-dtj-operator")["spec"].get("holderIdentity"),
        )
        assert holder in {p["metadata"]["name"] for p in operators()}
        for p in operators():
            assert p["spec"]["serviceAccountName"] == "dtj-dtj-operator"

        st = succeeded(kube, "default", "quickstart")
        assert float(st["result"]["testAccuracy"]) > 0.8, st["result"]
        logs = kube.run("logs", f"pod/{holder}").stdout
        assert "Forbidden" not in logs, logs[-3000:]

        uninstall = subprocess.run(
            [helm, "uninstall", "dtj", "--wait", "--timeout=3m"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert uninstall.returncode == 0, uninstall.stderr
        kube.run("delete", "dtj", "quickstart", "--timeout=120s")
        wait_for(
            "nothing left but the CRD",
            lambda: not kube.json("get", "pods,deployments,jobs,dtj")["items"],
            timeout=120,
        )
        assert kube.run("get", "clusterrole", "dtj-dtj-operator", check=False).returncode != 0
        assert kube.run("get", "crd", "decentralizedtrainingjobs.training.dtj.io").returncode == 0
    finally:
        cluster.stop()
