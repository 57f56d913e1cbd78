"""A model from a library: examples/hf/train.py (a transformers GPT-2 built from its
config) on 2 real processes with allreduce and dynamic batching.

Nothing in the model knows the job: its output is an object with `.loss`, its
batches are dicts, it has buffers (causal masks) and dropout. The job's
`evaluate=` scores it at every report and after the final average, and both
workers end with the same model (the same validation loss, to the last digit).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

from tests.trainer.waiting import incarnations, run_through

pytestmark = pytest.mark.procs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, str(ROOT / "examples" / "hf" / "train.py")]
STEPS, EVAL = 60, 20


def test_a_transformers_gpt2_trains_under_the_job_and_ends_as_one_model(tmp_path):
    cfg = TrainerConfig.model_validate(
        {
            "job": "hf-gpt2",
            "replicas": 2,
            "algorithm": {"name": "allreduce"},
            "batching": {"perWorker": 16, "dynamic": True},
            "training": {"steps": STEPS, "evalEvery": EVAL},
            "timeoutSeconds": 20,
        }
    )
    job = LocalJob(cfg, logs=tmp_path, command=SCRIPT, working_dir=ROOT)
    try:
        run_through(job, [], timeout=300)
        results = job.results()
    finally:
        job.close()
    assert sorted(results) == [0, 1]
    final = [r.metrics or {} for r in results.values()]
    assert final[0]["val_loss"] == final[1]["val_loss"], "one averaged model"
    reports = incarnations(tmp_path / "worker-0.log")[0]
    assert [r.step for r in reports] == list(range(EVAL, STEPS + 1, EVAL))
    scored = [(r.metrics or {})["val_loss"] for r in reports]
    assert scored[-1] < scored[0] < math.log(256)  # it learns from the untrained 5.55
    assert final[0]["perplexity"] == pytest.approx(math.exp(final[0]["val_loss"]))
