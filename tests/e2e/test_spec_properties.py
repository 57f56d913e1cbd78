"""The CRD and the Python models accept the same specs, and what they accept the
Pod API turns into pods or refuses with a 422 the operator reports as InvalidSpec.

A thousand generated specs (derandomized: the same ones every run), each
dry-run created against the real API server (dryRun=All, strict field
validation) and parsed by api.DecentralizedTrainingJob. The values mix the
valid and the refused for every field and rule, so both answers come up often.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pydantic
import pytest
from dtj_operator import api, render
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.e2e.kube import Kube

pytestmark = pytest.mark.e2e
NAMESPACE = "default"
PRIORITY_CLASS = "dtj-property-test"
CASES = 1000


def one(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


def some(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of `fields`."""
    return st.fixed_dictionaries({}, optional=fields)


def listed(values: list[Any], key: str, most: int = 2) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(values), max_size=most, unique_by=lambda v: str(v.get(key)))


TOKEN = {"serviceAccountToken": {"path": "token"}}
VOLUMES = [
    {"name": "data", "emptyDir": {}},
    {"name": "cache", "persistentVolumeClaim": {"claimName": "cache"}},
    {"name": "cm", "projected": {"sources": [{"configMap": {"name": "c"}}]}},
    {"name": "host", "hostPath": {"path": "/"}},
    {"name": "share", "nfs": {"server": "nfs.local", "path": "/"}},
    {"name": "tok", "projected": {"sources": [TOKEN]}},
    {"name": "tmp", "emptyDir": {}},
    {"name": "config", "configMap": {"name": "c"}},
]
MOUNTS = [
    {"name": "data", "mountPath": "/data"},
    {"name": "cache", "mountPath": "/cache"},
    {"name": "data", "mountPath": "/tmp/"},
    {"name": "data", "mountPath": "//etc/dtj/x"},
    {"name": "missing", "mountPath": "/missing"},
]
ENV = [
    {"name": "HF_HOME", "value": "/data"},
    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "DTJ_RANK", "value": "0"},
    {"name": "A=B", "value": "x"},
]
TOLERATIONS = [
    {"key": "spot", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "gpu", "operator": "Equal", "value": "a100"},
    {"operator": "Exists"},
    {"key": "", "operator": "Exists"},
    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
]
KEYS = one("team", "kueue.x-k8s.io/queue-name", "training.dtj.io/job", "bad key!")
QUANTITY = one("1", "500m", "2Gi", 2, 0.5, "lots")
RESOURCES = some(
    limits=one("1", ["cpu"]) | st.dictionaries(one("cpu", "memory", "nvidia.com/gpu"), QUANTITY),
    requests=st.dictionaries(one("cpu", "memory"), QUANTITY, max_size=2),
)

SPECS = some(
    replicas=one(-1, 0, 1, 2, 3, 4, 8, 1024, 1025),
    minReplicas=one(0, 1, 2, 5),
    maxReplicas=one(0, 2, 8, 2000),
    algorithm=some(
        name=one("dpsgd", "gosgd", "dasgd", "teleportation", "allreduce", "magic"),
        topology=one("ring", "torus", "complete", "star"),
        activeNodes=one("auto", "many", 0, 1, 3, 9),
        gossipProbability=one(0, 0.1, 1, 1.5),
        roundSeconds=one(0, 0.5),
        stalenessBound=one(-1, 0, 4),
    ),
    optimizer=some(
        name=one("sgd", "adamw", "adam"),
        lr=one(-0.1, 0, 0.05),
        momentum=one(0, 0.9, 1),
        gradClipNorm=one(0, 1.0),
        schedule=some(warmup=one(0, 0.1, 1), decay=one("constant", "cosine", "linear")),
    ),
    batching=some(
        perWorker=one(0, 8, 32),
        dynamic=st.booleans(),
        globalBatch=one(1, 16, 4096),
        minPerWorker=one(1, 4, 64),
        maxPerWorker=one(2, 512),
    ),
    training=some(
        model=one("mlp", ""),
        steps=one(0, 10),
        budget=some(samples=one(0, 100), epochs=one(0, 1.5), seconds=one(0, 60)),
        precision=one("fp32", "bf16", "fp8"),
        dataSplit=some(kind=one("ledger", "dirichlet", "sorted"), alpha=one(0, 0.5)),
        seed=one(-1, 0),
    ),
    template=some(
        imagePullPolicy=one("Always", "Sometimes"),
        command=one([], ["python", "train.py"]),
        args=one([], ["--fast"]),
        workingDir=one("", "/work"),
        env=listed(ENV, "name"),
        volumes=listed(VOLUMES, "name"),
        volumeMounts=listed(MOUNTS, "mountPath"),
        labels=st.dictionaries(KEYS, one("a", "not a value!"), max_size=2),
        annotations=st.dictionaries(KEYS, one("a"), max_size=2),
        serviceAccountName=one("default", "bad-coordinator"),
        priorityClassName=one(PRIORITY_CLASS, "system-node-critical"),
        resources=RESOURCES,
    ),
    nodePools=st.lists(
        st.fixed_dictionaries(
            {"name": one("a", "b", "Spot_Pool")},
            optional={
                "maxWorkers": one(-1, 0, 1, 2),
                "nodeSelector": one({"pool": "a"}),
                "tolerations": listed(TOLERATIONS, "key"),
                "speed": one(0, 1, 3),
                "preemptible": st.booleans(),
            },
        ),
        max_size=3,
        unique_by=lambda p: p["name"],
    ),
    runPolicy=some(
        backoffLimit=one(-1, 0, 3),
        activeDeadlineSeconds=one(0, 60),
        cleanPodPolicy=one("All", "Sometimes"),
        suspend=st.booleans(),
    ),
)


def manifest(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "prop", "namespace": NAMESPACE},
        "spec": spec,
    }


def server_answer(create: Any, body: dict[str, Any]) -> tuple[int, Any]:
    """The API server's status code for a dry-run create, and what it returned."""
    try:
        return 201, create(body)
    except ApiException as e:
        return e.status, e.body


def test_the_crd_and_the_models_agree_and_admitted_specs_make_pods(crds: Kube):
    # What the operator or the cluster's admin provides: the coordinator's account
    # (the operator's RBAC child) and a workload priority class.
    for obj in (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "prop-coordinator"}},
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": PRIORITY_CLASS},
            "value": 100,
        },
    ):
        crds.run("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(obj))
    apis = config.new_client_from_config(config_file=str(crds.kubeconfig))
    custom, core = client.CustomObjectsApi(apis), client.CoreV1Api(apis)
    strict = {"dry_run": "All", "field_validation": "Strict", "_preload_content": False}

    def create_job(body: dict[str, Any]) -> dict[str, Any]:
        resp = custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, body, **strict
        )
        return json.loads(resp.data)

    def create_pod(body: dict[str, Any]) -> Any:
        return core.create_namespaced_pod(NAMESPACE, body, **strict)

    seen: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=CASES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(spec=SPECS)
    def agree(spec: dict[str, Any]) -> None:
        code, stored = server_answer(create_job, manifest(spec))
        assert code in (201, 422), (code, stored)
        try:
            job = api.DecentralizedTrainingJob.model_validate(manifest(spec))
            python = None
        except pydantic.ValidationError as e:
            job, python = None, e
        assert (code == 201) == (python is None), (
            f"the API server said {code} ({stored if code != 201 else 'admitted'}) and "
            f"the Python models said {python or 'admitted'} for spec {json.dumps(spec)}"
        )
        seen["cases"] += 1
        if job is None:
            seen["refused by both"] += 1
            return
        seen["admitted by both"] += 1
        owner = render.owner_reference(stored)
        pods = [render.coordinator_pod(job, owner)]
        if not job.spec.run_policy.suspend:
            pods.append(render.worker_pod(job, owner, job.spec.replicas - 1))
        for pod in pods:
            code, answer = server_answer(create_pod, pod)
            # 422 is the path the operator ends as InvalidSpec naming the field; any
            # other refusal would be retried forever.
            assert code in (201, 422), (code, answer, spec)
            seen["pods admitted" if code == 201 else "pods refused (InvalidSpec)"] += 1

    agree()
    print(
        f"spec properties: {seen['cases']} generated specs, the API server and the models "
        f"agreed on all ({seen['admitted by both']} admitted, {seen['refused by both']} "
        f"refused); of their pods {seen['pods admitted']} admitted, "
        f"{seen['pods refused (InvalidSpec)']} refused with 422 (InvalidSpec)"
    )
    assert seen["cases"] >= CASES * 0.9
    assert seen["admitted by both"] >= 50 and seen["refused by both"] >= 50, seen
