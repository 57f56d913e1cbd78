"""A real control plane for the end-to-end tests, and the operator running on it.

By default the session starts the pinned local control plane (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok; see
dtj_operator.devcluster) and stops it afterwards. Set KUBECONFIG to run the
same tests against a cluster you already have (kind, k3d, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dtj_operator import devcluster

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Kube:
    """kubectl against one cluster, as a user would type it."""

    kubeconfig: Path
    kubectl_bin: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, *args], input=input, capture_output=True, text=True, env=self.env
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 90.0, every: float = 0.5) -> Any:
    """Poll until `probe()` is truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except AssertionError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last saw: {last!r}")


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    if os.environ.get("KUBECONFIG"):
        kubectl = shutil.which("kubectl")
        assert kubectl, "KUBECONFIG is set but no kubectl is on PATH"
        yield Kube(Path(os.environ["KUBECONFIG"]), kubectl)
        return
    cluster = devcluster.LocalCluster(tmp_path_factory.mktemp("cluster"), devcluster.build())
    cluster.start()
    try:
        yield Kube(cluster.kubeconfig, str(cluster.bin / "kubectl"))
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Kube:
    kube.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kube.run(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/decentralizedtrainingjobs.training.dtj.io",
    )
    return kube


@pytest.fixture(scope="session")
def operator(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real `kopf run` process of the operator; yields its log file."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "--standalone",
                "--all-namespaces",
                "-m",
                "dtj_operator.handlers",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=crds.env,
            cwd=ROOT,
        )
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15):
            print(log.read_text()[-5000:])


@pytest.fixture
def namespace(crds: Kube) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    crds.run("create", "namespace", name)
    wait_for(
        "the namespace's default service account",
        lambda: crds.run("get", "sa", "default", "-n", name, check=False).returncode == 0,
    )
    yield name
    crds.run("delete", "namespace", name, "--wait=false", check=False)
