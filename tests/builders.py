"""Small object builders shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def job_body(spec: dict[str, Any] | None = None, name: str = "demo") -> dict[str, Any]:
    """A job as the API server would hand it to the operator."""
    return {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": spec or {},
    }
