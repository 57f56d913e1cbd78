"""A user's CNN with BatchNorm through a leave and a join (4 real processes).

examples/cnn/train.py runs as every worker. Slot 1 gets SIGTERM at step 60 and
a replacement joins (minReplicas 4: the others wait for it). BatchNorm's
running statistics are buffers, not parameters: they must travel with the
warm start (the replacement evaluates in eval() mode as well as its peers at
once, where x0's statistics would not) and be averaged into the job's result
(every worker ends with the same model, buffers included, and they moved).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

from tests.trainer.waiting import incarnations, run_through

pytestmark = pytest.mark.procs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, str(ROOT / "examples" / "cnn" / "train.py")]
STEPS, EVAL, LEAVE_AT = 200, 20, 60


def test_a_cnns_batchnorm_statistics_move_with_the_warm_start_and_into_the_result(tmp_path):
    cfg = TrainerConfig.model_validate(
        {
            "job": "digits-cnn",
            "replicas": 4,
            "minReplicas": 4,
            "algorithm": {"name": "dpsgd", "topology": "one-peer-exponential"},
            "batching": {"perWorker": 32},
            "training": {"steps": STEPS, "evalEvery": EVAL},
            "timeoutSeconds": 10,
        }
    )
    job = LocalJob(cfg, logs=tmp_path, command=SCRIPT, working_dir=ROOT)
    try:
        run_through(job, [(1, signal.SIGTERM, LEAVE_AT)], timeout=300)
        results = job.results()
    finally:
        job.close()
    assert sorted(results) == [0, 1, 2, 3], "the replacement finished too"
    final = [r.metrics or {} for r in results.values()]
    assert len({m["model_fingerprint"] for m in final}) == 1, "one result model, buffers too"
    assert all(m["running_var_mean"] != pytest.approx(1.0, abs=0.05) for m in final)
    assert all(m["test_accuracy"] >= 0.93 for m in final), final

    reports = {s: incarnations(tmp_path / f"worker-{s}.log") for s in range(4)}
    peers = [
        (p.metrics or {})["test_accuracy"]
        for s in (0, 2, 3)
        for p in reports[s][0]
        if LEAVE_AT <= p.step <= LEAVE_AT + 2 * EVAL and "test_accuracy" in (p.metrics or {})
    ]
    assert peers
    # The replacement's model as it joined, evaluated in eval() mode: the members'
    # parameters *and* running statistics (x0's would not classify), while the first
    # workers started from x0 (chance).
    assert results[1].metrics["start_accuracy"] >= 0.9 * min(peers), (results[1].metrics, peers)
    assert all(results[s].metrics["start_accuracy"] < 0.5 for s in (0, 2, 3))
