"""A real control plane for the end-to-end tests, and the operator running on it.

By default the session starts the pinned local control plane (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok; see
dtj_devcluster.controlplane) and stops it afterwards. Set KUBECONFIG to run the
same tests against a cluster you already have (kind, k3d, ...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dtj_devcluster import controlplane as devcluster

from tests.e2e.kube import ROOT, Kube, new_namespace, start_operator, wait_for


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
        yield Kube(cluster.kubeconfig, str(cluster.bin / "kubectl"), cluster)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Kube:
    kube.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    crd = "decentralizedtrainingjobs.training.dtj.io"
    wait_for(
        f"the API server to serve {crd}",
        lambda: devcluster.established(kube.json("get", "crd", crd)),
        timeout=60,
        every=0.2,
    )
    return kube


@pytest.fixture(scope="session")
def helm() -> str:
    """The pinned helm, built from its Go module once (hack/helm/build.sh)."""
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "helm" / "build.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed e2e test prints what the cluster and the operator said about its
    namespace: a rare CI failure must be explainable from the CI log alone."""
    report = yield
    funcargs = getattr(item, "funcargs", {})
    namespace, log, kube = (funcargs.get(k) for k in ("namespace", "operator", "kube"))
    if report.when != "call" or not report.failed or not isinstance(namespace, str):
        return report
    if isinstance(kube, Kube):
        pods = kube.run("get", "pods,dtj", "-n", namespace, "-o", "wide", check=False)
        report.sections.append(("cluster", pods.stdout + pods.stderr))
    logs = {"operator": log}
    if isinstance(kube, Kube) and kube.local is not None:
        logs["node agent"] = kube.local.directory / "logs" / "node-agent.log"
    for who, path in logs.items():
        if isinstance(path, Path) and path.exists():
            lines = [
                line
                for line in path.read_text(errors="replace").splitlines()
                if namespace in line and "succeeded." not in line
            ]
            report.sections.append((f"{who} log (this namespace)", "\n".join(lines[-60:])))
    return report


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def operator_metrics() -> str:
    """Where the session's operator serves its Prometheus metrics (loopback)."""
    return f"http://127.0.0.1:{devcluster.free_port()}/metrics"


@pytest.fixture(scope="session")
def operator(
    crds: Kube, operator_metrics: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A real `kopf run` process of the operator; yields its log file."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    port = operator_metrics.split(":")[-1].split("/")[0]
    env = {"DTJ_OPERATOR_METRICS_PORT": port, "DTJ_OPERATOR_METRICS_ADDR": "127.0.0.1"}
    with open(log, "wb") as out:
        # Tests that run their own operator use namespaces not matching e2e-*.
        proc = start_operator(crds, "e2e-*", out, env)
    wait_for("the operator's metrics endpoint", lambda: _answers(operator_metrics), timeout=60)
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
    name = new_namespace(crds, "e2e")
    yield name
    crds.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def local(kube: Kube) -> devcluster.LocalCluster:
    if kube.local is None:
        pytest.skip("needs the local cluster's executing nodes (run without KUBECONFIG)")
    return kube.local
