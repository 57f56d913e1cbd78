"""Heterogeneous workers, 4 real processes: one has 3x slower modelled compute.

Dynamic batching gives the slow worker a smaller batch (measured speed, not
hints); a job-wide sample budget ends training once all workers together
have trained on it, and under an asynchronous method the fast workers do
more of that work. Not timed: these check who does what, not how fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

pytestmark = pytest.mark.procs

BUDGET = 4 * 32 * 100  # samples: 100 rounds of 4 x 32


def train(tmp_path: Path, algorithm: str, **batching: Any) -> dict[int, list[dict[str, Any]]]:
    cfg = TrainerConfig.model_validate(
        {
            "job": f"hetero-{algorithm}",
            "replicas": 4,
            "algorithm": {"name": algorithm},
            "optimizer": {"lr": 0.1, "momentum": 0.0 if algorithm == "gosgd" else 0.9},
            "batching": {"perWorker": 32, **batching},
            "training": {"budget": {"samples": BUDGET}, "evalEvery": 10},
        }
    )
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": "0.0005"} for s in range(4)}
    env["0"]["DTJ_SIMULATE_SLOWDOWN"] = "3"
    job = LocalJob(cfg, logs=tmp_path, extra_env=env)
    try:
        for slot in range(4):
            job.start_worker(slot)
        deadline = time.monotonic() + 240
        while job.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job.running(), "training did not end"
        assert not job.failed(), job.failed()
        assert len(job.results()) == 4
    finally:
        job.close()
    reports: dict[int, list[dict[str, Any]]] = {}
    for slot in range(4):
        lines = (tmp_path / f"worker-{slot}.log").read_text().splitlines()
        reports[slot] = [json.loads(x) for x in lines if x.startswith('{"rank"')]
    return reports


def test_dynamic_batching_moves_samples_from_the_slow_worker_to_the_fast_ones(tmp_path):
    reports = train(tmp_path, "allreduce", dynamic=True)
    last = {slot: r[-1] for slot, r in reports.items()}
    batches = {slot: r["batch"] for slot, r in last.items()}
    assert sum(batches.values()) == 128  # perWorker x workers: the global batch is kept
    # Measured compute speed drives it: about 3x the samples for each fast worker.
    for slot in (1, 2, 3):
        assert batches[slot] >= 2 * batches[0], batches
        assert last[slot]["compute_samples_per_second"] > 2 * last[0]["compute_samples_per_second"]
    # Synchronous: everyone ran the same rounds; the budget was spent, overshot by < a round.
    steps = {r[-1]["step"] for r in reports.values()}
    assert len(steps) == 1
    assert max(r["job_samples"] or 0 for r in last.values()) + 10 * 128 >= BUDGET


def test_under_a_budget_asynchronous_fast_workers_do_more_of_the_work(tmp_path):
    reports = train(tmp_path, "gosgd")
    rounds = {slot: r[-1]["step"] for slot, r in reports.items()}
    for slot in (1, 2, 3):
        assert rounds[slot] >= 2 * rounds[0], rounds
    done = sum(rounds.values()) * 32
    assert done + 4 * 20 * 32 >= BUDGET and done <= BUDGET + 4 * 20 * 32, (done, rounds)


def test_asynchronous_workers_share_their_speeds_through_the_coordinator(tmp_path):
    """gosgd with dynamic batching: no collective to compare notes, so speeds travel
    through the job's store; the slow worker computes fewer samples per gossip round."""
    reports = train(tmp_path, "gosgd", dynamic=True)
    batches = {slot: r[-1]["batch"] for slot, r in reports.items()}
    for slot in (1, 2, 3):
        assert batches[slot] >= 2 * batches[0], batches


def test_the_heterogeneous_example_runs_locally_as_the_readme_says():
    import subprocess
    import sys

    from tests.builders import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtj_operator.cli",
            "local",
            str(ROOT / "examples" / "heterogeneous.yaml"),
            "--simulate-sample-seconds",
            "0.002",
            "--simulate-slowdown",
            "3=3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "budget 19,200 samples" in lines[1], lines[1]
    plans = [line.split("batches ")[1] for line in lines if "batches " in line]
    assert plans, proc.stdout
    slow, *fast = (int(b) for b in reversed(plans[-1].split("/")))  # slot 3 is the slow one
    assert all(b >= 2 * slow for b in fast), plans[-1]
    assert lines[-1].startswith("Result: test accuracy"), lines[-1]
