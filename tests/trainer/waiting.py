"""Polling a running local job from a test, and reading its workers' logs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtj_trainer.launcher import LocalJob
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


def run_through(
    job: LocalJob, events: list[tuple[int, int, int]], timeout: float = 400
) -> dict[int, int]:
    """Start every slot; for each (slot, signal, step): once every worker reported that
    step, signal the slot, wait for it to stop and start its replacement; then wait
    for the end of training. Returns the first processes' pids, by slot."""
    for slot in range(job.cfg.replicas):
        job.start_worker(slot)
    pids = {s: p.pid for s, p in job.procs.items()}
    for slot, sig, at in events:
        wait(
            f"step {at}",
            lambda at=at: min((r.step for r in job.reports().values()), default=0) >= at,
        )
        job.signal(slot, sig)
        wait(f"slot {slot} to stop", lambda slot=slot: job.procs[slot].poll() is not None)
        job.start_worker(slot)
    wait("the end of training", lambda: not job.running(), timeout=timeout)
    assert not job.failed(), job.failed()
    return pids
