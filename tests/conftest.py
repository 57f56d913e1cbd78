"""Shared fixtures."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.builders import ROOT


@pytest.fixture
def quickstart() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
