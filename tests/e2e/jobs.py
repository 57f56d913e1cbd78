"""Jobs for the executing nodes, and reading them back (shared by the e2e tests)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tests.e2e.kube import ROOT, Kube

EXECUTING_POOL = {
    "name": "local",
    "nodeSelector": {"dtj.io/runtime": "process"},
    "tolerations": [
        {"key": "dtj.io/runtime", "operator": "Equal", "value": "process", "effect": "NoSchedule"}
    ],
}


def manifest(name: str, **spec: Any) -> str:
    """examples/quickstart.yaml on the executing nodes, with `spec` merged in."""
    body = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    body["metadata"]["name"] = name
    merged = copy.deepcopy(body["spec"])
    for key, value in spec.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        if isinstance(merged[key], dict):  # None removes a field of the example
            merged[key] = {k: v for k, v in merged[key].items() if v is not None}
    merged["nodePools"] = [EXECUTING_POOL]
    # One thread per worker (as the local launcher does): several pods share 2 cores.
    template = merged.setdefault("template", {})
    template["env"] = [*template.get("env", []), {"name": "OMP_NUM_THREADS", "value": "1"}]
    body["spec"] = merged
    return yaml.safe_dump(body)


def job_status(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return dict(kube.json("get", "dtj", name, "-n", ns).get("status") or {})


def pods(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any]]:
    items = kube.json("get", "pods", "-n", ns, "-l", f"training.dtj.io/job={name}")["items"]
    return {p["metadata"]["name"]: p for p in items}
