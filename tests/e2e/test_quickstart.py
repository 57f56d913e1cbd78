"""Flow 1 on a real API server: apply -> children -> scheduled -> Running -> delete -> GC."""

from __future__ import annotations

import json

import pytest
from dtj_trainer.config import TrainerConfig

from tests.e2e.kube import ROOT, Kube, running_pods, wait_for

pytestmark = pytest.mark.e2e
EXAMPLE = str(ROOT / "examples" / "quickstart.yaml")


def test_quickstart_job_runs_and_is_garbage_collected(kube: Kube, operator, namespace):
    ns = ["-n", namespace]
    kube.run("apply", *ns, "-f", EXAMPLE)

    svc = wait_for(
        "the headless service",
        lambda: kube.run("get", "svc", "quickstart", *ns, "-o", "json", check=False).stdout,
    )
    svc = json.loads(svc)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True

    def workers():
        pods = kube.json(
            "get",
            "pods",
            *ns,
            "-l",
            "training.dtj.io/job=quickstart,app.kubernetes.io/component=worker",
        )["items"]
        return (
            pods
            if len(pods) == 4 and all(p["status"].get("phase") == "Running" for p in pods)
            else None
        )

    pods = wait_for("4 running worker pods", workers)
    for pod in pods:
        assert pod["spec"]["nodeName"]  # bound by kube-scheduler
        assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "500m"
        assert pod["status"]["podIP"].startswith("127."), "fake pod IPs stay on loopback"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "DecentralizedTrainingJob"

    def ready_status():
        st = kube.json("get", "dtj", "quickstart", *ns).get("status", {})
        return st if st.get("readyReplicas") == 4 and st.get("phase") == "Running" else None

    status = wait_for("status readyReplicas=4, phase Running", ready_status)
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert running["status"] == "True" and running["reason"] == "WorkersReady"
    assert status["selector"] == "training.dtj.io/job=quickstart,app.kubernetes.io/component=worker"
    assert status["observedGeneration"] == 1

    table = kube.run("get", "dtj", *ns).stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "PHASE",
        "READY",
        "DESIRED",
        "ALGORITHM",
        "STEP",
        "LOSS",
        "ACCURACY",
        "AGE",
    ]
    assert table[1].split()[:5] == ["quickstart", "Running", "4", "4", "dpsgd"]

    cm = kube.json("get", "configmap", "quickstart-config", *ns)
    cfg = TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert cfg.replicas == 4 and cfg.algorithm.name == "dpsgd" and cfg.backend == "gloo"

    kube.run("delete", "dtj", "quickstart", *ns)

    def collected():
        left = kube.run(
            "get", "pods,svc,configmap", *ns, "-l", "training.dtj.io/job=quickstart", "-o", "name"
        ).stdout
        return left.strip() == ""

    wait_for("children garbage-collected through ownerReferences", collected, timeout=150)


def test_the_gpu_example_lands_on_gpu_nodes_with_nccl(kube: Kube, operator, namespace):
    ns = ["-n", namespace]
    kube.run("apply", *ns, "-f", str(ROOT / "examples" / "gpu.yaml"))
    selector = "training.dtj.io/job=quickstart-gpu,app.kubernetes.io/component=worker"
    pods = wait_for("4 running GPU workers", lambda: running_pods(kube, namespace, selector, 4))
    nodes = {n["metadata"]["name"]: n for n in kube.json("get", "nodes")["items"]}
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]  # bound by kube-scheduler
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cm = kube.json("get", "configmap", "quickstart-gpu-config", *ns)
    assert TrainerConfig.model_validate_json(cm["data"]["config.json"]).backend == "nccl"
    kube.run("delete", "dtj", "quickstart-gpu", *ns)


INVALID = [
    ({"replicas": -1}, "spec.replicas"),
    ({"algorithm": {"name": "magic"}}, "spec.algorithm.name"),
    ({"algorithm": {"topology": "star"}}, "spec.algorithm.topology"),
    ({"replicas": 4, "minReplicas": 5}, "spec.minReplicas"),
    ({"replicas": 2, "algorithm": {"activeNodes": 3}}, "spec.algorithm.activeNodes"),
    ({"algorithm": {"activeNodes": "many"}}, "spec.algorithm.activeNodes"),
    ({"algorithm": {"gossipProbability": 1.5}}, "spec.algorithm.gossipProbability"),
    (
        {"algorithm": {"name": "teleportation"}, "optimizer": {"momentum": 0.9}},
        "spec.optimizer",
    ),
    ({"algorithm": {"name": "teleportation"}, "optimizer": {"name": "adamw"}}, "spec.optimizer"),
    ({"optimizer": {"name": "adamw", "momentum": 0.9}}, "spec.optimizer.momentum"),
    ({"optimizer": {"name": "adam"}}, "spec.optimizer.name"),
    ({"optimizer": {"schedule": {"warmup": 1}}}, "spec.optimizer.schedule.warmup"),
    ({"optimizer": {"gradClipNorm": 0}}, "spec.optimizer.gradClipNorm"),
    ({"training": {"precision": "fp8"}}, "spec.training.precision"),
    ({"template": {"args": ["--fast"]}}, "spec.template.args"),
    ({"optimizer": {"lr": 0}}, "spec.optimizer.lr"),
    ({"runPolicy": {"backoffLimit": -2}}, "spec.runPolicy.backoffLimit"),
    ({"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "spec.runPolicy.cleanPodPolicy"),
    ({"nodePools": [{"name": "Spot_Pool"}]}, "spec.nodePools[0].name"),
    (
        {"training": {"dataSplit": {"kind": "dirichlet", "alpha": 0}}},
        "spec.training.dataSplit.alpha",
    ),
    ({"replicas": 2000}, "spec.replicas"),
    ({"batching": {"minPerWorker": 64, "maxPerWorker": 8}}, "spec.batching.minPerWorker"),
    (
        {"batching": {"dynamic": True, "globalBatch": 8, "minPerWorker": 4}},
        "spec.batching.globalBatch",
    ),
    ({"template": {"imagePullPolicy": "Sometimes"}}, "spec.template.imagePullPolicy"),
    ({"training": {"steps": 10, "budget": {"samples": 100}}}, "spec.training.steps"),
    ({"training": {"budget": {"samples": 10, "epochs": 1}}}, "spec.training.budget"),
    ({"training": {"budget": {}}}, "spec.training.budget"),
    ({"nodePools": [{"name": "a", "maxWorkers": -1}]}, "spec.nodePools[0].maxWorkers"),
    # The template cannot take the job's identity or reach into the node.
    ({"template": {"env": [{"name": "DTJ_RANK", "value": "0"}]}}, "spec.template.env"),
    (
        {"template": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
        "spec.template.volumes",
    ),
    ({"template": {"volumes": [{"name": "config", "emptyDir": {}}]}}, "spec.template.volumes"),
    (
        {"template": {"volumeMounts": [{"name": "data", "mountPath": "/etc/dtj"}]}},
        "spec.template.volumeMounts",
    ),
    # CEL and Python agree on the same path however written (issue 21)
    (
        {"template": {"volumeMounts": [{"name": "data", "mountPath": "/tmp/"}]}},
        "spec.template.volumeMounts",
    ),
    ({"template": {"resources": {"limits": "1"}}}, "spec.template.resources.limits"),
    ({"template": {"resources": {"limits": ["cpu"]}}}, "spec.template.resources.limits"),
    ({"template": {"resources": {"limits": {"cpu": "lots"}}}}, "spec.template.resources.limits"),
    ({"template": {"labels": {"training.dtj.io/job": "other"}}}, "spec.template.labels"),
    (
        {"template": {"labels": {"app.kubernetes.io/managed-by": "me"}}},
        "spec.template.labels",
    ),
    (
        {"template": {"annotations": {"training.dtj.io/moved-away": "x"}}},
        "spec.template.annotations",
    ),
    (
        {"template": {"serviceAccountName": "bad-coordinator"}},
        "spec.template.serviceAccountName",
    ),
    # What creating a job allows: nothing beyond what its namespace holds (issue 21).
    (
        {"template": {"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]}},
        "spec.template.volumes",
    ),
    (
        {
            "template": {
                "volumes": [
                    {
                        "name": "token",
                        "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]},
                    }
                ]
            }
        },
        "spec.template.volumes",
    ),
    (
        {"template": {"priorityClassName": "system-cluster-critical"}},
        "spec.template.priorityClassName",
    ),
    ({"nodePools": [{"name": "a", "tolerations": [{"operator": "Exists"}]}]}, "spec.nodePools"),
    (
        {
            "nodePools": [
                {
                    "name": "a",
                    "tolerations": [{"key": "node-role.kubernetes.io/control-plane"}],
                }
            ]
        },
        "spec.nodePools",
    ),
    ({"replicas": 3, "nodePools": [{"name": "a", "maxWorkers": 2}]}, "spec.replicas"),
]


def test_long_names_and_immutable_fields_are_rejected(crds: Kube, namespace):
    long = {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": "x" * 50, "namespace": namespace},
        "spec": {},
    }
    proc = crds.run("apply", "-f", "-", input=json.dumps(long), check=False)
    assert proc.returncode != 0 and "metadata.name must be at most 45" in proc.stderr
    for name in ("a.b", "1job"):  # a Service cannot have such a name
        bad = {**long, "metadata": {"name": name, "namespace": namespace}}
        proc = crds.run("apply", "-f", "-", input=json.dumps(bad), check=False)
        assert proc.returncode != 0 and "without dots" in proc.stderr, (name, proc.stderr)
    ok = {**long, "metadata": {"name": "fixed", "namespace": namespace}}
    crds.run("apply", "-f", "-", input=json.dumps(ok))
    ok["spec"] = {"training": {"model": "logreg"}}
    proc = crds.run("apply", "-f", "-", input=json.dumps(ok), check=False)
    assert proc.returncode != 0 and "spec.training" in proc.stderr
    assert "immutable" in proc.stderr
    for change, field in [
        ({"algorithm": {"name": "gosgd"}}, "spec.algorithm"),
        ({"optimizer": {"lr": 0.5}}, "spec.optimizer"),
        ({"training": {"seed": 7}}, "spec.training"),
        # members must agree on the length and the batch plan (issue 18, finding 7)
        ({"training": {"steps": 999}}, "spec.training"),
        ({"batching": {"perWorker": 8}}, "spec.batching"),
    ]:
        proc = crds.run("apply", "-f", "-", input=json.dumps({**ok, "spec": change}), check=False)
        assert proc.returncode != 0 and field in proc.stderr and "immutable" in proc.stderr
    ok["spec"] = {"replicas": 6, "runPolicy": {"suspend": True}}  # these may change
    crds.run("apply", "-f", "-", input=json.dumps(ok))


@pytest.mark.parametrize(("spec", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(crds: Kube, spec, field):
    manifest = {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": spec,
    }
    proc = crds.run("apply", "-f", "-", input=json.dumps(manifest), check=False)
    assert proc.returncode != 0, f"accepted an invalid spec {spec}"
    assert field in proc.stderr, proc.stderr
