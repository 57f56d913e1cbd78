"""The committed CRDs are exactly what the API models generate."""

from __future__ import annotations

import pytest
from dtj_operator import crdgen


@pytest.mark.parametrize("target", crdgen.TARGETS, ids=lambda p: str(p.relative_to(crdgen.ROOT)))
def test_committed_crd_matches_models(target):
    assert target.read_text() == crdgen.render(), (
        f"{target} is stale: run `python -m dtj_operator.crdgen --write`"
    )


def test_committed_coordinator_policy_matches_the_status_model():
    assert crdgen.POLICY_TARGET.read_text() == crdgen.coordinator_policy(), "run make crds"
    for field in ("phase", "countedPods", "preemptions", "conditions"):  # guarded
        assert f"oldObject.status.{field}" in crdgen.coordinator_policy(), field
    assert "object.status.progress" not in crdgen.coordinator_policy()


def test_schema_is_structural():
    """No construct the API server rejects in a structural schema survives conversion."""
    schema = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def walk(node, path):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if "properties" in node:
            assert "additionalProperties" not in node, path
            assert node.get("type") == "object", path
            for k, v in node["properties"].items():
                walk(v, f"{path}.{k}")
        if "items" in node:
            walk(node["items"], f"{path}[]")
        if not node.get("x-kubernetes-int-or-string") and path.count(".") > 1:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path

    walk(schema, "")


def test_every_spec_field_is_described():
    spec = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def walk(node, path):
        for k, v in node.get("properties", {}).items():
            assert v.get("description"), f"spec{path}.{k} has no description"
            walk(v, f"{path}.{k}")
        if "items" in node:
            walk(node["items"], path + "[]")

    walk(spec, "")


def test_scale_subresource_and_short_name():
    spec = crdgen.crd()["spec"]
    version = spec["versions"][0]
    assert spec["names"]["shortNames"] == ["dtj"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    assert "status" in version["subresources"]
