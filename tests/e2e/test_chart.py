"""The Helm chart, with the pinned helm built from its Go module (hack/helm/build.sh):
linted, rendered, installed on the real control plane, and the operator run with
nothing but the chart's RBAC (its service account's token, not system:masters)."""

from __future__ import annotations

import filecmp
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.kube import ROOT, Kube, new_namespace, start_operator, wait_for

pytestmark = pytest.mark.e2e
CHART = ROOT / "helm" / "dtj-operator"


@pytest.fixture(scope="session")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "helm" / "build.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def run(helm: str, *args: str, kube: Kube | None = None) -> str:
    env = kube.env if kube else None
    out = subprocess.run([helm, *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"helm {' '.join(args)}: {out.stderr}"
    return out.stdout


def test_the_chart_lints_and_renders_what_the_operator_needs(helm: str):
    run(helm, "lint", "--strict", str(CHART))
    docs = [
        d
        for d in yaml.safe_load_all(
            run(helm, "template", "dtj", str(CHART), "--kube-version", "v1.36.3")
        )
        if d
    ]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Role"} <= kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert pod["containers"][0]["image"].endswith(":" + chart["appVersion"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    sec = pod["containers"][0]["securityContext"]
    assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"] is True
    assert "--leader-elect" in pod["containers"][0]["args"]
    for crd in (ROOT / "crds").glob("*.yaml"):  # one source of truth for the CRD
        assert filecmp.cmp(crd, CHART / "crds" / crd.name, shallow=False), crd.name


def token_kubeconfig(kube: Kube, token: str, path: Path) -> Path:
    """The test cluster's kubeconfig, authenticating as a service account."""
    config = yaml.safe_load(kube.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    return path


def test_helm_install_and_the_operator_works_with_only_the_charts_rbac(
    helm: str, crds: Kube, tmp_path: Path
):
    kube = crds
    system = new_namespace(kube, "chart")
    # No operator pod (its image is not published): the chart's objects, RBAC included.
    run(helm, "install", "dtj", str(CHART), "-n", system, "--set", "replicas=0", kube=kube)
    try:
        sa = "dtj-dtj-operator"
        token = kube.run("create", "token", sa, "-n", system, "--duration=1h").stdout.strip()
        as_operator = {"KUBECONFIG": str(token_kubeconfig(kube, token, tmp_path / "sa.yaml"))}
        who = f"system:serviceaccount:{system}:{sa}"
        for verb, what, allowed in [
            ("create", "pods", "yes"),
            ("patch", "decentralizedtrainingjobs.training.dtj.io/status", "yes"),
            ("get", "secrets", "no"),  # least privilege: nothing it does not use
            ("create", "deployments.apps", "no"),
        ]:
            got = kube.run("auth", "can-i", verb, what, f"--as={who}", check=False)
            assert got.stdout.strip() == allowed, (verb, what, got.stdout)

        ns = new_namespace(kube, "chartjob")
        body = {
            "apiVersion": "training.dtj.io/v1alpha1",
            "kind": "DecentralizedTrainingJob",
            "metadata": {"name": "rbac", "namespace": ns},
            "spec": {"replicas": 2},
        }
        with open(tmp_path / "operator.log", "wb") as log:
            op = start_operator(kube, ns, log, env=as_operator)
            try:
                kube.run("apply", "-f", "-", input=json.dumps(body))

                def status() -> dict:
                    return kube.json("get", "dtj", "rbac", "-n", ns).get("status") or {}

                wait_for("the job Running", lambda: status().get("phase") == "Running")
                policy = kube.json("get", "networkpolicy", "rbac", "-n", ns)
                assert policy["spec"]["podSelector"]["matchLabels"]["training.dtj.io/job"] == "rbac"
                victim = "rbac-worker-0"
                kube.run("delete", "pod", victim, "-n", ns, "--wait=false")
                wait_for("the deletion counted", lambda: status().get("preemptions") == 1)
                wait_for("2 ready again", lambda: status().get("readyReplicas") == 2)
                events = kube.json("get", "events", "-n", ns)["items"]
                assert any(e["reason"] == "WorkerPreempted" for e in events), events
            finally:
                op.terminate()
                op.wait(timeout=20)
        assert "Forbidden" not in (tmp_path / "operator.log").read_text()
        kube.run("delete", "namespace", ns, "--wait=false")
    finally:
        run(helm, "uninstall", "dtj", "-n", system, kube=kube)
    assert kube.run("get", "clusterrole", "dtj-dtj-operator", check=False).returncode != 0
    kube.run("delete", "namespace", system, "--wait=false", check=False)
