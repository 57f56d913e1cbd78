"""The API models reject what the CRD's CEL rules reject, with the field named."""

from __future__ import annotations

import pydantic
import pytest
from dtj_operator import api

TOKEN = {"serviceAccountToken": {"path": "token"}}
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"


def parse(spec):
    return api.DecentralizedTrainingJob.model_validate({"metadata": {"name": "x"}, "spec": spec})


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"replicas": 0}, "replicas"),
        ({"algorithm": {"name": "sgd-magic"}}, "algorithm"),
        ({"replicas": 4, "minReplicas": 5}, "spec.minReplicas"),
        ({"replicas": 9, "maxReplicas": 8}, "spec.replicas"),
        ({"replicas": 2, "algorithm": {"activeNodes": 3}}, "spec.algorithm.activeNodes"),
        ({"batching": {"minPerWorker": 9, "maxPerWorker": 8}}, "spec.batching.minPerWorker"),
        ({"optimizer": {"lr": 0}}, "lr"),
        ({"replicaz": 3}, "replicaz"),
        ({"training": {"steps": 10, "budget": {"samples": 100}}}, "steps or budget"),
        ({"training": {"budget": {"samples": 10, "epochs": 1}}}, "samples or epochs"),
        ({"template": {"env": [{"name": "DTJ_RANK", "value": "0"}]}}, "template.env"),
        ({"template": {"volumes": [{"name": "h", "hostPath": {}}]}}, "restricted"),
        ({"template": {"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]}}, "admits"),
        (
            {"template": {"volumes": [{"name": "t", "projected": {"sources": [TOKEN]}}]}},
            "serviceAccountToken",
        ),
        ({"template": {"serviceAccountName": "other-job-coordinator"}}, "-coordinator"),
        ({"template": {"priorityClassName": "system-node-critical"}}, "priorityClassName"),
        ({"nodePools": [{"name": "a", "tolerations": [{"operator": "Exists"}]}]}, "empty key"),
        (
            {"nodePools": [{"name": "a", "tolerations": [{"key": CONTROL_PLANE}]}]},
            "control-plane",
        ),
        (
            {
                "replicas": 4,
                "nodePools": [{"name": "a", "maxWorkers": 1}, {"name": "b", "maxWorkers": 2}],
            },
            "sum of the node pools",
        ),
        ({"template": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "template.volumes"),
        ({"template": {"volumeMounts": [{"name": "d", "mountPath": "/tmp/"}]}}, "volumeMounts"),
        ({"template": {"volumeMounts": [{"name": "d", "mountPath": "//etc/dtj/x"}]}}, "Mounts"),
        ({"template": {"resources": {"limits": "1"}}}, "resources.limits must map"),
        ({"template": {"resources": {"limits": ["cpu"]}}}, "resources.limits must map"),
        ({"template": {"resources": {"limits": {"cpu": "lots"}}}}, "not a quantity"),
        ({"template": {"resources": {"limits": {"cpu": 0.5}}}}, '"500m"'),
        ({"template": {"resources": {"limitz": {}}}}, "unknown fields"),
        ({"template": {"labels": {"training.dtj.io/slot": "1"}}}, "template.labels"),
        ({"template": {"annotations": {"training.dtj.io/x": "1"}}}, "template.annotations"),
        ({"template": {"serviceAccountName": "x-coordinator"}}, "serviceAccountName"),
        ({"template": {"args": ["--fast"]}}, "spec.template.args"),
        ({"optimizer": {"name": "adamw", "momentum": 0.9}}, "momentum is sgd's"),
        ({"optimizer": {"schedule": {"warmup": 1}}}, "warmup"),
        ({"training": {"precision": "fp8"}}, "precision"),
    ],
)
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        parse(spec)


@pytest.mark.parametrize("name", ["a.b", "1job", "x" * 46, "Upper"])
def test_names_a_service_cannot_have_are_refused_as_the_crd_refuses_them(name):
    with pytest.raises(pydantic.ValidationError, match=r"metadata\.name"):
        api.DecentralizedTrainingJob.model_validate({"metadata": {"name": name}, "spec": {}})


def test_defaults_fill_every_section():
    job = parse({})
    assert job.spec.replicas == 4
    assert job.spec.algorithm.name == "dpsgd"
    assert job.spec.run_policy.backoff_limit == 3
    assert job.spec.training.data_split.kind == "ledger"


def test_wire_form_is_camel_case():
    wire = parse({"runPolicy": {"backoffLimit": 1}}).spec.wire()
    assert wire["runPolicy"]["backoffLimit"] == 1
    assert "run_policy" not in wire


def test_the_template_may_add_what_is_not_reserved():
    job = parse(
        {
            "template": {
                "env": [{"name": "HF_HOME", "value": "/data"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "labels": {"kueue.x-k8s.io/queue-name": "gpus"},
                "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                "serviceAccountName": "trainer",
                "priorityClassName": "spot-training",
            }
        }
    )
    assert job.spec.template.labels == {"kueue.x-k8s.io/queue-name": "gpus"}


@pytest.mark.parametrize("kind", api.RESTRICTED_VOLUME_TYPES)
def test_the_volume_types_pod_security_restricted_admits_are_admitted(kind):
    job = parse({"template": {"volumes": [{"name": "v", kind: {}}]}})
    assert kind in job.spec.template.volumes[0]


def test_a_projected_volume_without_a_token_is_admitted():
    cm = {"configMap": {"name": "c"}}
    job = parse({"template": {"volumes": [{"name": "p", "projected": {"sources": [cm]}}]}})
    assert job.spec.template.volumes[0]["projected"]["sources"] == [cm]


def test_pools_with_room_for_every_replica_or_an_unbounded_one_are_admitted():
    bounded = [{"name": "a", "maxWorkers": 1}, {"name": "b", "maxWorkers": 3}]
    assert parse({"replicas": 4, "nodePools": bounded}).spec.replicas == 4
    tolerant = [{"name": "a", "maxWorkers": 1}, {"name": "spot", "tolerations": [{"key": "spot"}]}]
    assert parse({"replicas": 9, "nodePools": tolerant}).spec.replicas == 9
