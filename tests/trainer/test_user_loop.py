"""A user's own training script through membership changes (4 real processes).

examples/lm/train.py (a byte-level GPT on the standard library's sources, AdamW,
warmup + cosine, clipping) runs as every worker, the way `dtj local` and the
operator run `template.command`. Mid-run slot 1 gets SIGTERM (it hands its model
off) and slot 2 SIGKILL (its model is lost); each gets a replacement. Against
an undisturbed run with the same seed: the final validation loss of the
averaged model is within 2%, the survivors never restarted (one incarnation,
their steps only go up), and each replacement warm-starts: at the members'
step, with a first reported loss near theirs instead of the untrained ~5.5.
"""

from __future__ import annotations

import math
import re
import signal
import sys
from pathlib import Path

import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

from tests.trainer.waiting import incarnations, run_through

pytestmark = pytest.mark.procs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, str(ROOT / "examples" / "lm" / "train.py")]
STEPS = 200
EVENTS = [(1, signal.SIGTERM, 60), (2, signal.SIGKILL, 100)]  # slot, signal, at step
UNTRAINED = math.log(256)  # a byte model's loss at x0


def config() -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": "byte-gpt",
            "replicas": 4,
            "algorithm": {"name": "dpsgd", "topology": "one-peer-exponential"},
            "batching": {"perWorker": 32},
            "training": {"steps": STEPS, "evalEvery": 20},
            "timeoutSeconds": 10,
        }
    )


def train(logs: Path, events: list[tuple[int, int, int]]) -> tuple[LocalJob, dict[int, int]]:
    job = LocalJob(config(), logs=logs, command=SCRIPT, working_dir=ROOT)
    try:
        return job, run_through(job, events)
    finally:
        job.close()


def test_a_users_script_trains_through_a_leave_and_a_kill_as_if_undisturbed(tmp_path: Path):
    quiet, _ = train(tmp_path / "quiet", [])
    undisturbed = quiet.result().metrics
    job, pids = train(tmp_path / "events", EVENTS)
    disturbed = job.result().metrics
    assert undisturbed and disturbed
    assert len(job.results()) == 4  # the replacements finished too
    assert disturbed["val_loss"] == pytest.approx(undisturbed["val_loss"], rel=0.02)
    assert disturbed["val_loss"] < 0.6 * UNTRAINED  # it trained
    logs = {s: incarnations(tmp_path / "events" / f"worker-{s}.log") for s in range(4)}
    for slot in (0, 3):  # the survivors: one process throughout, never back to step 0
        assert job.procs[slot].pid == pids[slot]
        assert len(logs[slot]) == 1
        steps = [r.step for r in logs[slot][0]]
        assert steps == sorted(steps) and steps[-1] == STEPS
    for slot, _, at in EVENTS:
        text = (tmp_path / "events" / f"worker-{slot}.log").read_text()
        start = int(re.findall(r"warm start from the members' .* at step (\d+)", text)[-1])
        assert start >= at
        first = logs[slot][-1][0]
        peers = [r for s in (0, 3) for r in logs[s][0] if r.step == first.step]
        assert first.metrics and peers
        peer_loss = sum((r.metrics or {})["loss"] for r in peers) / len(peers)
        assert first.metrics["loss"] < 1.15 * peer_loss, (first.metrics, peer_loss)
