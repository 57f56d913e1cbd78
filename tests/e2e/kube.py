"""kubectl as a user types it, and polling for conditions (never fixed sleeps)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtj_devcluster.controlplane import LocalCluster
from dtj_operator.cli import operator_command

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Kube:
    """kubectl against one cluster, as a user would type it."""

    kubeconfig: Path
    kubectl_bin: str
    local: LocalCluster | None = None  # the local cluster, when the tests started it

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, *args], input=input, capture_output=True, text=True, env=self.env
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 90.0, every: float = 0.5) -> Any:
    """Poll until `probe()` is truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except AssertionError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last saw: {last!r}")


def start_operator(
    kube: Kube, namespace: str, log: Any, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real operator process (`dtj operator`'s command) watching `namespace` (a glob)."""
    return subprocess.Popen(
        operator_command(namespace),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**kube.env, **(env or {})},
        cwd=ROOT,
    )


def new_namespace(kube: Kube, prefix: str) -> str:
    """A fresh namespace, returned once pods can be created in it (default SA exists)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kube.run("create", "namespace", name)
    wait_for(
        "the namespace's default service account",
        lambda: kube.run("get", "sa", "default", "-n", name, check=False).returncode == 0,
    )
    return name


def running_pods(kube: Kube, namespace: str, selector: str, count: int) -> list[Any] | None:
    """The `count` live (not terminating) pods matching `selector`, once all are Running."""
    pods = kube.json("get", "pods", "-n", namespace, "-l", selector)["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    ok = len(live) == count and all(p["status"].get("phase") == "Running" for p in live)
    return live if ok else None
