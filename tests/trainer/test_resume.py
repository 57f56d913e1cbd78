"""A whole job stopped and started again goes on from its checkpoint (4 real processes).

Every worker gets SIGTERM at once (what suspending a job does to its pods): each
writes its checkpoint as it leaves. A new coordinator and four new processes on
the same checkpoint directory (a resumed job, or a new job pointed at the old
one's directory) go on from the step each left at, with its optimizer state,
instead of from step 0.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob
from dtj_trainer.metrics import Progress

from tests.trainer.waiting import wait

pytestmark = pytest.mark.procs

STEPS = 400


def reports(log: Path) -> list[Progress]:
    return [
        Progress(**json.loads(line))
        for line in log.read_text().splitlines()
        if line.startswith('{"rank"')
    ]


def test_a_suspended_job_resumes_from_where_every_worker_left(tmp_path: Path) -> None:
    cfg = TrainerConfig.model_validate(
        {
            "job": "resume",
            "replicas": 4,
            "algorithm": {"name": "dpsgd"},
            "optimizer": {"lr": 0.1, "momentum": 0.9},
            "training": {
                "steps": STEPS,
                "evalEvery": 20,
                "checkpoint": {"path": str(tmp_path / "ckpt"), "everySteps": 1000},
            },
            "timeoutSeconds": 10,
        }
    )
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": "0.0005"} for s in range(4)}
    first = LocalJob(cfg, logs=tmp_path / "first", extra_env=env)
    try:
        for slot in range(4):
            first.start_worker(slot)
        wait("step 120", lambda: min((r.step for r in first.reports().values()), default=0) >= 120)
        for slot in range(4):
            first.signal(slot, signal.SIGTERM)
        wait("every worker to leave", lambda: not first.running())
        assert {s: p.returncode for s, p in first.procs.items()} == dict.fromkeys(range(4), 0)
    finally:
        first.close()
    # everySteps is 1000: these were written as the workers left, not on a schedule.
    left = {
        s: torch.load(tmp_path / "ckpt" / f"worker-{s}.pt", weights_only=True) for s in range(4)
    }
    assert all(120 <= c["step"] < STEPS for c in left.values()), {
        s: c["step"] for s, c in left.items()
    }
    assert all(c["optimizer"]["state"] for c in left.values())  # the momentum buffers
    before = {s: reports(tmp_path / "first" / f"worker-{s}.log")[-1] for s in range(4)}

    second = LocalJob(cfg, logs=tmp_path / "second", extra_env=env)
    try:
        for slot in range(4):
            second.start_worker(slot)
        wait("the end of training", lambda: not second.running(), timeout=300)
        assert {s: p.returncode for s, p in second.procs.items()} == dict.fromkeys(range(4), 0)
        for slot in range(4):
            log = (tmp_path / "second" / f"worker-{slot}.log").read_text()
            (resumed,) = re.findall(r"resumed from the checkpoint at step (\d+)", log)
            assert int(resumed) == left[slot]["step"]
            after = reports(tmp_path / "second" / f"worker-{slot}.log")
            # Synchronous: the members agree on the most advanced step and go on from it.
            assert after[0].step > max(c["step"] for c in left.values())
            assert after[-1].step == STEPS
            # Its loss goes on from where it was, far from a fresh model's.
            assert after[0].loss < 2 * max(before[slot].loss, 0.05), (after[0], before[slot])
        assert second.result().averaged_accuracy > 0.9
    finally:
        second.close()
