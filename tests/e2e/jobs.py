"""Jobs for the executing nodes, and reading them back (shared by the e2e tests)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tests.e2e.kube import ROOT, Kube, wait_for

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


def succeeded(
    kube: Kube, ns: str, name: str, *, timeout: float = 420, check: Any = None
) -> dict[str, Any]:
    """Wait for the job to end, assert it Succeeded, and return its status once the
    coordinator has written status.result (moments later). `check()` runs every poll
    (e.g. to fail at once when the operator under test died)."""

    def ended() -> dict[str, Any] | None:
        if check is not None:
            check()
        st = job_status(kube, ns, name)
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for(f"{name} to finish", ended, timeout=timeout, every=1.0)
    assert st["phase"] == "Succeeded", st
    return dict(
        wait_for("status.result", lambda: (s := job_status(kube, ns, name)).get("result") and s)
    )


def pods(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any]]:
    items = kube.json("get", "pods", "-n", ns, "-l", f"training.dtj.io/job={name}")["items"]
    return {p["metadata"]["name"]: p for p in items}
