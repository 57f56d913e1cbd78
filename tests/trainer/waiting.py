"""Polling a running local job from a test, and reading its workers' logs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtj_trainer.metrics import Progress


def wait(what: str, probe: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll `probe` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def incarnations(log: Path) -> list[list[Progress]]:
    """A slot's log split by process: each incarnation's progress reports, in order."""
    out: list[list[Progress]] = []
    for line in log.read_text().splitlines():
        if "joined as" in line:
            out.append([])
        elif line.startswith('{"rank"'):
            out[-1].append(Progress(**json.loads(line)))
    return out
