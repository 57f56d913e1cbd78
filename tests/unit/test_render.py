"""Rendering a job into child objects, and the operator -> trainer contract."""

from __future__ import annotations

import json

import pytest
from dtj_operator import api, render
from dtj_trainer import entrypoint
from dtj_trainer.config import TrainerConfig

from tests.builders import job_body


def children(spec=None):
    body = job_body(spec)
    job = api.DecentralizedTrainingJob.from_body(body)
    return job, render.desired_children(job, body)


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_children_are_owned_and_labelled():
    _, objs = children({"replicas": 3})
    assert [o["kind"] for o in objs] == [
        "NetworkPolicy",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    ] + ["Pod"] * 4
    for o in objs:
        (ref,) = o["metadata"]["ownerReferences"]
        assert ref["uid"] == "uid-1" and ref["controller"] is True
        assert o["metadata"]["labels"][render.LABEL_JOB] == "demo"
    workers = [
        p
        for p in by_kind(objs, "Pod")
        if p["metadata"]["labels"][render.LABEL_COMPONENT] == "worker"
    ]
    assert [p["metadata"]["name"] for p in workers] == [
        "demo-worker-0",
        "demo-worker-1",
        "demo-worker-2",
    ]
    assert [p["metadata"]["labels"][render.LABEL_SLOT] for p in workers] == ["0", "1", "2"]


def test_headless_service_publishes_unready_addresses():
    _, objs = children()
    (svc,) = by_kind(objs, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True


def test_pods_are_locked_down():
    _, objs = children()
    for pod in by_kind(objs, "Pod"):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        if pod["metadata"]["name"] == "demo-coordinator":
            assert spec["serviceAccountName"] == "demo-coordinator"
        else:
            assert spec["automountServiceAccountToken"] is False, "workers hold no credentials"
        sec = spec["containers"][0]["securityContext"]
        assert sec["allowPrivilegeEscalation"] is False
        assert sec["capabilities"]["drop"] == ["ALL"]


def test_gpu_limit_selects_nccl_and_quantities_become_strings():
    job, objs = children({"template": {"resources": {"limits": {"nvidia.com/gpu": 1}}}})
    worker = by_kind(objs, "Pod")[1]
    assert worker["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert render.trainer_config(job).backend == "nccl"
    for none in (0, "0", "0m"):  # a zero GPU limit is a CPU pod (issue 21)
        job, _ = children({"template": {"resources": {"limits": {"nvidia.com/gpu": none}}}})
        assert render.trainer_config(job).backend == "gloo", none


def test_the_users_command_args_and_working_dir_run_in_the_workers_only():
    _, objs = children(
        {
            "template": {
                "command": ["python", "/scripts/train.py"],
                "args": ["--epochs", "3"],
                "workingDir": "/scripts",
            }
        }
    )
    coordinator, *workers = by_kind(objs, "Pod")
    for pod in workers:
        (c,) = pod["spec"]["containers"]
        assert c["command"] == ["python", "/scripts/train.py"]
        assert c["args"] == ["--epochs", "3"] and c["workingDir"] == "/scripts"
        assert {e["name"] for e in c["env"]} >= {"DTJ_CONFIG", "DTJ_RANK", "DTJ_POD_IP"}
    (c,) = coordinator["spec"]["containers"]
    assert c["command"][:3] == ["python", "-m", "dtj_trainer.coordinator"]
    assert "args" not in c and "workingDir" not in c
    _, default = children()
    assert by_kind(default, "Pod")[1]["spec"]["containers"][0]["command"] == list(
        render.TRAINER_COMMAND
    )


def test_suspended_job_has_no_pods():
    _, objs = children({"runPolicy": {"suspend": True}})
    assert by_kind(objs, "Pod") == []


def test_pools_fill_in_order_up_to_their_bounds():
    pools = [
        {"name": "ondemand", "nodeSelector": {"pool": "ondemand"}, "maxWorkers": 2},
        {
            "name": "spot",
            "nodeSelector": {"pool": "spot"},
            "maxWorkers": 3,
            "preemptible": True,
            "tolerations": [{"key": "pool", "value": "spot", "effect": "NoSchedule"}],
        },
    ]
    job, objs = children({"replicas": 5, "nodePools": pools})
    assert [p.name if p else None for p in render.assign_pools(job)] == [
        "ondemand",
        "ondemand",
        "spot",
        "spot",
        "spot",
    ]
    spot_worker = next(p for p in by_kind(objs, "Pod") if p["metadata"]["name"] == "demo-worker-2")
    assert spot_worker["spec"]["nodeSelector"] == {"pool": "spot"}
    assert spot_worker["spec"]["tolerations"][0]["key"] == "pool"
    coordinator = next(
        p for p in by_kind(objs, "Pod") if p["metadata"]["name"] == "demo-coordinator"
    )
    assert coordinator["spec"]["nodeSelector"] == {"pool": "ondemand"}, "store stays off spot nodes"


def test_rendered_pod_round_trips_through_the_trainer_entrypoint(tmp_path, quickstart):
    """What the operator renders is exactly what the real trainer entrypoint parses."""
    body = {**quickstart, "metadata": {**quickstart["metadata"], "namespace": "ns", "uid": "u"}}
    job = api.DecentralizedTrainingJob.from_body(body)
    objs = render.desired_children(job, body)
    (cm,) = by_kind(objs, "ConfigMap")
    pod = next(p for p in by_kind(objs, "Pod") if p["metadata"]["name"].endswith("worker-2"))
    container = pod["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    (tmp_path / render.CONFIG_KEY).write_text(cm["data"][render.CONFIG_KEY])
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["DTJ_CONFIG"] == f"{mount['mountPath']}/{render.CONFIG_KEY}"
    env["DTJ_CONFIG"] = str(tmp_path / render.CONFIG_KEY)
    runtime = entrypoint.load_runtime(env)
    assert runtime.rank == 2
    assert runtime.config == render.trainer_config(job)
    assert runtime.config.algorithm.topology == "ring"
    assert runtime.config.store_host == "coordinator.quickstart.ns.svc"
    assert container["command"] == ["python", "-m", "dtj_trainer"]
    assert json.loads(cm["data"][render.CONFIG_KEY])["replicas"] == 4


def test_entrypoint_rejects_a_rank_outside_the_job(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(TrainerConfig(job="j", replicas=2).model_dump_json(by_alias=True))
    with pytest.raises(SystemExit, match=r"outside 0\.\.1"):
        entrypoint.load_runtime({"DTJ_CONFIG": str(path), "DTJ_RANK": "2"})
    with pytest.raises(SystemExit, match="DTJ_RANK must be set"):
        entrypoint.load_runtime({"DTJ_CONFIG": str(path)})


def test_coordinator_may_patch_only_its_own_jobs_status():
    _, objs = children()
    (role,) = by_kind(objs, "Role")
    (rule,) = role["rules"]
    assert rule["resources"] == ["decentralizedtrainingjobs/status"]
    assert rule["resourceNames"] == ["demo"]
    assert set(rule["verbs"]) == {"get", "patch"}
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["subjects"][0]["name"] == "demo-coordinator"


def test_each_worker_is_told_its_pools_speed_to_seed_the_batch_plan():
    pools = [
        {"name": "a100", "nodeSelector": {"gpu": "a100"}, "maxWorkers": 1, "speed": 3},
        {"name": "t4", "nodeSelector": {"gpu": "t4"}, "speed": 1},
    ]
    _, objs = children({"replicas": 3, "nodePools": pools, "batching": {"dynamic": True}})

    def hint(pod: dict) -> str:
        env = pod["spec"]["containers"][0]["env"]
        return next(e["value"] for e in env if e["name"] == "DTJ_SPEED_HINT")

    workers = sorted(
        (p for p in by_kind(objs, "Pod") if "-worker-" in p["metadata"]["name"]),
        key=lambda p: p["metadata"]["name"],
    )
    assert [hint(p) for p in workers] == ["3.0", "1.0", "1.0"]


def test_only_the_jobs_own_pods_and_the_monitoring_namespace_get_in():
    body = job_body()
    job = api.DecentralizedTrainingJob.from_body(body)
    objs = render.desired_children(job, body, render.equality_selector("team=monitoring"))
    (policy,) = by_kind(objs, "NetworkPolicy")
    own = policy["spec"]["podSelector"]["matchLabels"]
    for pod in by_kind(objs, "Pod"):  # the policy covers every pod of the job
        assert own.items() <= pod["metadata"]["labels"].items()
    peers, metrics = policy["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": own}}]}
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    (worker, *_) = [p for p in by_kind(objs, "Pod") if "worker" in p["metadata"]["name"]]
    ports = worker["spec"]["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": render.METRICS_PORT, "protocol": "TCP"} in ports
    closed = render.desired_children(job, body, {})
    assert len(by_kind(closed, "NetworkPolicy")[0]["spec"]["ingress"]) == 1
    with pytest.raises(ValueError, match="key=value"):
        render.equality_selector("monitoring")


def test_scheduling_fields_and_autoscaler_annotations_reach_the_pods():
    _, objs = children(
        {
            "template": {
                "labels": {"kueue.x-k8s.io/queue-name": "gpus"},
                "annotations": {"example.com/team": "vision"},
                "priorityClassName": "training",
                "schedulerName": "volcano",
                "affinity": {"podAntiAffinity": {}},
            }
        }
    )
    pods = {p["metadata"]["labels"][render.LABEL_COMPONENT]: p for p in by_kind(objs, "Pod")}
    for component, pod in pods.items():
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
        assert meta["labels"][render.LABEL_JOB] == "demo"
        assert meta["annotations"]["example.com/team"] == "vision"
        assert spec["priorityClassName"] == "training" and spec["schedulerName"] == "volcano"
        assert ("affinity" in spec) == (component == "worker")
    assert pods["worker"]["metadata"]["annotations"][render.SAFE_TO_EVICT] == "true"
    assert pods["coordinator"]["metadata"]["annotations"][render.SAFE_TO_EVICT] == "false"
    assert pods["coordinator"]["metadata"]["annotations"][render.DO_NOT_DISRUPT] == "true"
    _, objs = children({"template": {"annotations": {render.SAFE_TO_EVICT: "false"}}})
    assert all(
        p["metadata"]["annotations"][render.SAFE_TO_EVICT] == "false"
        for p in objs
        if p["kind"] == "Pod"
    )


def test_every_env_name_the_operator_sets_is_reserved_in_the_api():
    _, objs = children({"nodePools": [{"name": "a", "speed": 2}]})
    set_by_us = {
        e["name"]
        for pod in by_kind(objs, "Pod")
        for c in pod["spec"]["containers"]
        for e in c["env"]
        if e["name"].startswith(("DTJ_", "LOCAL_"))
    }
    assert set_by_us == set(api.RESERVED_ENV)
    worker = next(p for p in by_kind(objs, "Pod") if p["metadata"]["name"].endswith("worker-0"))
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "1"), "one process per pod"
