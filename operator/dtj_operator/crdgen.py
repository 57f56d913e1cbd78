"""Generate the CustomResourceDefinition from the pydantic API models.

    python -m dtj_operator.crdgen            # print the CRD YAML
    python -m dtj_operator.crdgen --write    # refresh crds/ and the chart copy

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI
v3.0 schema. `structural` converts: references inlined, `Optional[X]` to X,
numeric exclusive bounds to the v3.0 boolean form, free-form objects marked
`x-kubernetes-preserve-unknown-fields`, and no `additionalProperties` beside
`properties` (the API server prunes unknown fields; kubectl's strict field
validation reports them).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from . import api

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = f"{api.GROUP}_{api.PLURAL}.yaml"
TARGETS = [ROOT / "crds" / CRD_FILE, ROOT / "helm" / "dtj-operator" / "crds" / CRD_FILE]
_DROP = {"title", "$defs"}


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert one pydantic JSON schema node (recursively) to a structural schema."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = copy.deepcopy(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if node.get("x-kubernetes-int-or-string"):
        node.pop("anyOf", None)
        node.pop("type", None)
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express union {variants} structurally")
        node = {**variants[0], **node}
        if "$ref" in node:
            return structural(node, defs)
    if node.get("default", 0) is None:
        node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            node[bound.replace("exclusiveM", "m")] = node[bound]
            node[bound] = True
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value and "properties" not in node:
                out[key] = structural(value, defs)
            elif value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if "required" in out:
        out["required"] = sorted(out["required"])
    return out


def _model_schema(model: type[api.Model]) -> dict[str, Any]:
    return structural(model.model_json_schema(by_alias=True, mode="validation"))


def spec_schema() -> dict[str, Any]:
    schema = _model_schema(api.JobSpec)
    schema["x-kubernetes-validations"] = [
        {"rule": r.cel, "message": r.message, "fieldPath": "." + r.field.split(".", 1)[1]}
        for r in api.CEL_RULES
    ]
    algorithm = schema["properties"]["algorithm"]["properties"]
    algorithm["activeNodes"]["x-kubernetes-validations"] = [
        {
            "rule": "type(self) == string ? self == 'auto' : int(self) >= 1",
            "message": "activeNodes must be a positive integer or 'auto'",
        }
    ]
    schema["x-kubernetes-validations"] += [
        {
            # Every member must agree on these (a worker reads them once, at start):
            # a change would split old and new workers. Length, budget and batching
            # included; replicas and minReplicas are followed live by the coordinator.
            "rule": "self.training == oldSelf.training",
            "message": "training is immutable while the job exists (every worker must train "
            "the same model, data and length); create a new job",
            "fieldPath": ".training",
        },
        {
            "rule": "self.batching == oldSelf.batching",
            "message": "batching is immutable (the members plan their batches together); "
            "create a new job",
            "fieldPath": ".batching",
        },
        {
            "rule": "self.algorithm == oldSelf.algorithm",
            "message": "algorithm is immutable (running workers cannot switch method); "
            "create a new job",
            "fieldPath": ".algorithm",
        },
        {
            "rule": "self.optimizer == oldSelf.optimizer",
            "message": "optimizer is immutable (replacements must match the running "
            "workers); create a new job",
            "fieldPath": ".optimizer",
        },
    ]
    return schema


def crd() -> dict[str, Any]:
    """The whole CRD object."""
    root = {
        "type": "object",
        "description": (
            "A training job whose workers average their models by gossip instead of "
            "all-reduce, so fast workers never wait for slow ones and preempted workers "
            "leave without a global restart."
        ),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": _model_schema(api.JobStatus),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {api.MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters "
                "(worker pod names and hostnames are derived from it)",
            },
            {
                "rule": f"self.metadata.name.matches('{api.NAME_PATTERN}')",
                "message": f"metadata.name must be {api.NAME_MESSAGE}",
            },
        ],
    }
    columns = [
        ("Phase", "string", ".status.phase", "Job phase"),
        ("Ready", "integer", ".status.readyReplicas", "Ready workers"),
        ("Desired", "integer", ".spec.replicas", "Desired workers"),
        ("Algorithm", "string", ".spec.algorithm.name", "Training method"),
        ("Step", "integer", ".status.progress.step", "Training step"),
        ("Loss", "string", ".status.progress.loss", "Training loss"),
        ("Accuracy", "string", ".status.result.testAccuracy", "Final test accuracy"),
        ("Age", "date", ".metadata.creationTimestamp", "Age"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "training"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, "description": d}
                        for n, t, p, d in columns
                    ],
                }
            ],
        },
    }


# What a job's coordinator may write into the job's status: the trainer's report.
COORDINATOR_WRITES = ("progress", "result")
POLICY_TARGET = ROOT / "helm" / "dtj-operator" / "templates" / "coordinator-policy.yaml"


def _unchanged(field: str) -> str:
    new, old = f"object.status.{field}", f"oldObject.status.{field}"
    return f"(has({new}) ? (has({old}) && {new} == {old}) : !has({old}))"


def coordinator_policy() -> str:
    """A ValidatingAdmissionPolicy: a coordinator's account (<job>-coordinator) may
    change only status.progress and status.result, whatever its Role allows (the
    Role's resourceNames already confine it to its own job's status)."""
    fields = [
        name
        for name, f in api.JobStatus.model_fields.items()
        if (f.alias or name) not in COORDINATOR_WRITES
    ]
    aliases = [api.JobStatus.model_fields[n].alias or n for n in fields]
    unchanged = " && ".join(_unchanged(a) for a in aliases)
    absent = " && ".join(f"!has(object.status.{a})" for a in aliases)
    expression = (
        "!has(object.status) ? !has(oldObject.status) : "
        f"(!has(oldObject.status) ? ({absent}) : ({unchanged}))"
    )
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "NAME"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [api.GROUP],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": [f"{api.PLURAL}/status"],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "a-coordinator",
                    "expression": "request.userInfo.username.startsWith("
                    "'system:serviceaccount:') && request.userInfo.username.endsWith("
                    "':' + object.metadata.name + '-coordinator')",
                }
            ],
            "validations": [
                {
                    "expression": expression,
                    "message": "a job's coordinator may write status.progress and "
                    "status.result only",
                    "reason": "Forbidden",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "NAME"},
        "spec": {"policyName": "NAME", "validationActions": ["Deny"]},
    }
    name = '{{ include "dtj-operator.fullname" . }}-coordinator-status'
    labels = '  labels:\n    {{- include "dtj-operator.labels" . | nindent 4 }}\n'
    header = (
        "# Generated by `python -m dtj_operator.crdgen --write` (coordinator_policy).\n"
        "# A job's coordinator may change status.progress and status.result only.\n"
    )
    docs = []
    for obj in (policy, binding):
        text = yaml.safe_dump(obj, sort_keys=False, width=100)
        text = text.replace("name: NAME\n", f"name: {name}\n" + labels, 1)
        docs.append(text.replace("policyName: NAME", f"policyName: {name}"))
    return header + "---\n".join(docs)


def render() -> str:
    header = "# Generated by `python -m dtj_operator.crdgen --write` from dtj_operator/api.py.\n"
    header += "# Do not edit by hand: change the models and regenerate.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the DecentralizedTrainingJob CRD.")
    parser.add_argument("--write", action="store_true", help="write crds/ and the chart copy")
    args = parser.parse_args(argv)
    text = render()
    if not args.write:
        print(text, end="")
        return 0
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target.relative_to(ROOT)}")
    POLICY_TARGET.write_text(coordinator_policy())
    print(f"wrote {POLICY_TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
