"""Shared fixtures: repository paths and small object builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def quickstart() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())


def job_body(spec: dict[str, Any] | None = None, name: str = "demo") -> dict[str, Any]:
    """A job as the API server would hand it to the operator."""
    return {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": spec or {},
    }
