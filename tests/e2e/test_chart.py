"""The Helm chart, with the pinned helm built from its Go module (hack/helm/build.sh):
linted, rendered, installed on the real control plane, and the operator run with
nothing but the chart's RBAC (its service account's token, not system:masters)."""

from __future__ import annotations

import filecmp
import functools
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.kube import ROOT, Kube, new_namespace, start_operator, wait_for

pytestmark = pytest.mark.e2e
CHART = ROOT / "helm" / "dtj-operator"
PROCESS_TOLERATION = {
    "key": "dtj.io/runtime",
    "operator": "Equal",
    "value": "process",
    "effect": "NoSchedule",
}


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
    # its own Lease: two releases in one namespace do not share one (issue 21)
    assert f"--lease-name={deploy['metadata']['name']}" in pod["containers"][0]["args"]
    aggregated = {
        d["metadata"]["name"]: d["metadata"]["labels"]
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith(("-edit", "-view"))
    }
    assert aggregated["dtj-dtj-operator-edit"]["rbac.authorization.k8s.io/aggregate-to-edit"]
    assert aggregated["dtj-dtj-operator-view"]["rbac.authorization.k8s.io/aggregate-to-view"]
    off = render(helm, "userRoles.aggregate=false")
    assert not [d for d in off if d["metadata"]["name"].endswith(("-edit", "-view"))]
    for crd in (ROOT / "crds").glob("*.yaml"):  # one source of truth for the CRD
        assert filecmp.cmp(crd, CHART / "crds" / crd.name, shallow=False), crd.name


def token_kubeconfig(kube: Kube, token: str, path: Path) -> Path:
    """The test cluster's kubeconfig, authenticating as a service account."""
    config = yaml.safe_load(kube.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    return path


def can_i(verb: str, what: str, *scope: str) -> list[str]:
    """`kubectl auth can-i` arguments; `what` is resource[:subresource]."""
    resource, _, sub = what.partition(":")
    return ["auth", "can-i", verb, resource, *scope, *([f"--subresource={sub}"] if sub else [])]


def answers(kube: Kube, args: list[str], expected: str) -> bool:
    return kube.run(*args, check=False).stdout.strip() == expected


def render(helm: str, *values: str) -> list[dict]:
    args = [a for v in values for a in ("--set", v)]
    out = run(helm, "template", "dtj", str(CHART), "--kube-version", "v1.36.3", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def test_one_watched_namespace_gets_a_role_and_bad_values_are_refused(helm: str):
    docs = render(helm, "watchNamespace=team-a")
    role = next(d for d in docs if d["kind"] == "Role" and "leader" not in d["metadata"]["name"])
    assert role["metadata"]["namespace"] == "team-a"
    assert any("pods" in r["resources"] for r in role["rules"])
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    cluster_resources = {res for r in cluster["rules"] for res in r["resources"]}
    assert cluster_resources == {"nodes", "customresourcedefinitions"}, cluster_resources
    wide = next(d for d in render(helm, "watchNamespace=team-*") if d["kind"] == "ClusterRole")
    assert any("pods" in r["resources"] for r in wide["rules"])
    digest = "sha256:" + "a" * 64
    deploy = next(d for d in render(helm, f"image.digest={digest}") if d["kind"] == "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@" + digest)
    for bad, says in [
        ("replicas=-1", "/replicas"),
        ("networkPolicy.metricsFrom=monitoring", "metricsFrom"),
        ("image.digest=latest", "digest"),
        ("replica=2", "replica"),  # a typo is not silently ignored
    ]:
        out = subprocess.run(
            [helm, "template", "dtj", str(CHART), "--kube-version", "v1.36.3", "--set", bad],
            capture_output=True,
            text=True,
        )
        assert out.returncode != 0 and says in out.stderr, (bad, out.stderr)


def test_helm_install_and_the_operator_works_with_only_the_charts_rbac(
    helm: str, crds: Kube, tmp_path: Path
):
    """Cluster-wide install: RBAC checked with can-i. One-namespace install (a Role):
    the operator runs a job there on that release's service-account token alone."""
    kube = crds
    wide = new_namespace(kube, "chart")
    # No operator pod (its image is not published): the chart's objects, RBAC included.
    notes = run(helm, "install", "dtj", str(CHART), "-n", wide, "--set", "replicas=0", kube=kube)
    assert "kubectl apply -f examples/quickstart.yaml" in notes and "every namespace" in notes
    system = new_namespace(kube, "chartns")
    ns = new_namespace(kube, "chartjob")
    try:
        who = f"system:serviceaccount:{wide}:dtj-dtj-operator"
        for verb, what, allowed in [
            ("create", "pods", "yes"),
            ("patch", "decentralizedtrainingjobs.training.dtj.io:status", "yes"),
            ("update", "decentralizedtrainingjobs.training.dtj.io:finalizers", "yes"),
            ("update", "decentralizedtrainingjobs.training.dtj.io", "no"),
            ("get", "secrets", "no"),  # least privilege: nothing it does not use
            ("create", "deployments.apps", "no"),
        ]:
            got = kube.run(*can_i(verb, what, f"--as={who}"), check=False)
            assert got.stdout.strip() == allowed, (verb, what, got.stdout)
        # The built-in roles gain the job's rights (aggregated ClusterRoles): a
        # namespace's editors run jobs there, its viewers read them.
        for user, role in (("alice", "edit"), ("bob", "view")):
            binding = [f"--clusterrole={role}", f"--user={user}", "-n", ns]
            kube.run("create", "rolebinding", user, *binding)
        for user, verb, what, allowed in [
            ("alice", "create", "decentralizedtrainingjobs.training.dtj.io", "yes"),
            ("alice", "patch", "decentralizedtrainingjobs.training.dtj.io:scale", "yes"),
            ("alice", "patch", "decentralizedtrainingjobs.training.dtj.io:status", "no"),
            ("bob", "list", "decentralizedtrainingjobs.training.dtj.io", "yes"),
            ("bob", "create", "decentralizedtrainingjobs.training.dtj.io", "no"),
            ("bob", "delete", "decentralizedtrainingjobs.training.dtj.io", "no"),
        ]:
            args = can_i(verb, what, "-n", ns, f"--as={user}")
            wait_for(
                f"{user} {'may' if allowed == 'yes' else 'may not'} {verb} {what}",
                functools.partial(answers, kube, args, allowed),
                timeout=30,
            )

        # Its uninstall hook runs for real, on an executing node (the virtualenv is the image).
        values = ["--set", "replicas=0", "--set", f"watchNamespace={ns}"]
        values += ["--set", "nodeSelector.dtj\\.io/runtime=process"]
        values += ["--set-json", f"tolerations={json.dumps([PROCESS_TOLERATION])}"]
        run(helm, "install", "one", str(CHART), "-n", system, *values, kube=kube)
        sa = "one-dtj-operator"
        who = f"system:serviceaccount:{system}:{sa}"
        for verb, what, where, allowed in [
            ("create", "pods", ns, "yes"),
            ("create", "pods", "default", "no"),  # only the watched namespace
            ("watch", "nodes", "", "yes"),
        ]:
            scope = ["-n", where] if where else []
            got = kube.run("auth", "can-i", verb, what, *scope, f"--as={who}", check=False)
            assert got.stdout.strip() == allowed, (verb, what, where, got.stdout)
        token = kube.run("create", "token", sa, "-n", system, "--duration=1h").stdout.strip()
        as_operator = {"KUBECONFIG": str(token_kubeconfig(kube, token, tmp_path / "sa.yaml"))}
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
                # The coordinator's account may write progress, not the job's phase.
                coordinator = f"--as=system:serviceaccount:{ns}:rbac-coordinator"
                for patch, allowed in [
                    ({"status": {"progress": {"step": 1}}}, True),
                    ({"status": {"phase": "Succeeded"}}, False),
                    ({"status": {"preemptions": 0}}, False),
                ]:
                    got = kube.run(
                        "patch",
                        "dtj",
                        "rbac",
                        "-n",
                        ns,
                        "--subresource=status",
                        "--type=merge",
                        "-p",
                        json.dumps(patch),
                        coordinator,
                        check=False,
                    )
                    assert (got.returncode == 0) == allowed, (patch, got.stderr)
                    if not allowed:
                        assert "coordinator may write status.progress" in got.stderr, got.stderr
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
        # Uninstalled while the job runs: the hook lifts the workers' finalizer, so
        # deleting the job afterwards leaves nothing Terminating.
        tracked = [
            p["metadata"]["name"]
            for p in kube.json("get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=worker")[
                "items"
            ]
            if "training.dtj.io/worker-tracking" in (p["metadata"].get("finalizers") or [])
        ]
        assert tracked, "the workers should carry the tracking finalizer while the job runs"
        run(helm, "uninstall", "one", "-n", system, "--wait", "--timeout=3m", kube=kube)
        kube.run("delete", "dtj", "rbac", "-n", ns)
        wait_for(
            "the job's pods gone without an operator",
            lambda: not kube.json("get", "pods", "-n", ns)["items"],
        )
    finally:
        run(helm, "uninstall", "dtj", "-n", wide, "--no-hooks", kube=kube)
        subprocess.run([helm, "uninstall", "one", "-n", system], env=kube.env, check=False)
    assert kube.run("get", "clusterrole", "dtj-dtj-operator", check=False).returncode != 0
    for name in (ns, wide, system):
        kube.run("delete", "namespace", name, "--wait=false", check=False)


def test_the_dashboard_and_pod_monitors_ship_in_the_chart(helm: str):
    docs = render(helm, "metrics.podMonitor.enabled=true", "metrics.podMonitor.labels.release=prom")
    (board,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = json.loads((CHART / "dashboards" / "dtj-training.json").read_text())
    assert json.loads(board["data"]["dtj-training.json"]) == committed
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    workers = monitors["dtj-dtj-operator-workers"]
    assert workers["metadata"]["labels"]["release"] == "prom"
    assert workers["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert workers["spec"]["namespaceSelector"] == {"any": True}
    assert "dtj-dtj-operator" in monitors  # the operator's own metrics
    one = render(helm, "metrics.podMonitor.enabled=true", "watchNamespace=team-a")
    scoped = next(d for d in one if d["kind"] == "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not [d for d in render(helm) if d["kind"] == "PodMonitor"]  # off by default
