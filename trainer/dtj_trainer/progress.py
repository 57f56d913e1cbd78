"""How training progress travels from the workers to the job's status.

    worker --(store key progress/<rank>, every evalEvery steps)--> coordinator
    coordinator --(PATCH .../decentralizedtrainingjobs/<job>/status, every 10 s)--> API server

Workers already report to the job's coordinator store, so the coordinator
(one small, stable pod per job) aggregates and writes `status.progress` with
a service account allowed to patch only its own job's status. The operator
never connects to pods, and no worker needs API credentials.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import statistics
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import Progress, Result

GROUP, VERSION, PLURAL = "training.dtj.io", "v1alpha1", "decentralizedtrainingjobs"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def aggregate(reports: list[Progress]) -> dict[str, Any]:
    """status.progress from the workers' latest reports (decimal strings, like quantities)."""
    if not reports:
        return {}
    distances = [r.consensus_distance for r in reports if r.consensus_distance is not None]
    out: dict[str, Any] = {
        "step": min(r.step for r in reports),
        "loss": f"{sum(r.loss for r in reports) / len(reports):.4f}",
        "samplesPerSecond": f"{sum(r.samples_per_second for r in reports):.1f}",
        "updated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if distances:
        out["consensusDistance"] = f"{sum(distances) / len(distances):.6g}"
    counted = [r.job_samples for r in reports if r.job_samples is not None]
    if counted:
        out["samples"] = max(counted)
    if any(r.batch is not None for r in reports):
        out["workers"] = [
            {
                "slot": r.rank,
                "step": r.step,
                "batch": r.batch,
                **(
                    {"computeSamplesPerSecond": f"{r.compute_samples_per_second:.1f}"}
                    if r.compute_samples_per_second is not None
                    else {}
                ),
            }
            for r in sorted(reports, key=lambda r: r.rank)
        ]
    return out


def read_reports(store: Any, slots: list[int]) -> list[Progress]:
    """The latest progress report of each worker slot that has one."""
    return [Progress(**r) for r in _records(store, "progress", slots)]


def read_results(store: Any, slots: list[int]) -> list[Result]:
    """The result of each worker slot that has finished."""
    return [Result(**r) for r in _records(store, "result", slots)]


def _records(store: Any, kind: str, slots: list[int]) -> list[dict[str, Any]]:
    keys = [f"{kind}/{slot}" for slot in slots]
    return [json.loads(store.get(key)) for key in keys if store.check([key])]


def summarize_results(results: list[Result]) -> dict[str, Any]:
    """status.result from the workers that finished: the averaged model's test accuracy
    (the same on every worker: they average together at the end) and the range of
    their own, or for a user's loop the mean of what the workers reported last.
    Workers that left early report no result."""
    if not results:
        return {}
    out: dict[str, Any] = {"steps": max(r.steps for r in results), "workers": len(results)}
    own = [r.worker_accuracy for r in results if r.worker_accuracy is not None]
    if own and results[0].averaged_accuracy is not None:
        out["testAccuracy"] = f"{results[0].averaged_accuracy:.4f}"
        out["workerAccuracy"] = f"{min(own):.4f}-{max(own):.4f}"
    names = sorted({name for r in results for name in r.metrics or {}})
    if names:
        out["metrics"] = {
            name: f"{statistics.mean(v):.6g}"
            for name in names
            if (v := [r.metrics[name] for r in results if r.metrics and name in r.metrics])
        }
    return out


@dataclass(frozen=True)
class StatusWriter:
    """PATCHes one job's status subresource over HTTPS with a bearer token."""

    server: str
    token: str
    namespace: str
    job: str
    context: ssl.SSLContext

    @classmethod
    def in_cluster(cls, namespace: str, job: str) -> StatusWriter:
        import os

        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        return cls(f"https://{host}:{port}", (SA_DIR / "token").read_text(), namespace, job, ctx)

    def read_spec(self) -> dict[str, Any]:
        """The job's spec, read through its status subresource (the coordinator's Role
        may get and patch that, and nothing else)."""
        url = (
            f"{self.server}/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/"
            f"{PLURAL}/{self.job}/status"
        )
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=self.context, timeout=10) as resp:
            spec: dict[str, Any] = json.loads(resp.read()).get("spec") or {}
        return spec

    def write(self, status: dict[str, Any]) -> None:
        """Merge-patch these status fields (progress, result)."""
        url = (
            f"{self.server}/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/"
            f"{PLURAL}/{self.job}/status"
        )
        req = urllib.request.Request(
            url,
            data=json.dumps({"status": status}).encode(),
            method="PATCH",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/merge-patch+json",
            },
        )
        with urllib.request.urlopen(req, context=self.context, timeout=10) as resp:
            resp.read()
