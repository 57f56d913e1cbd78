"""Polling a running local job from a test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait(what: str, probe: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll `probe` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
