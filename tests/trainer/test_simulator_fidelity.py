"""The simulator's asynchronous mode against real gloo processes on the same settings.

dasgd, 4 workers, worker 0 three times slower (modelled compute: 38 ms a step
on a fast worker), 60 rounds each. The simulator (latency and per-round jitter
at its defaults) must reproduce what the real processes measure: how stale the
gradients each worker receives are (mean, per worker) and how many arrive
during training (the fast workers' on their mean). Before the asynchronous mode
delivered messages after the sender's compute, the simulator measured staleness
0 here (sequential SGD).
"""

from __future__ import annotations

import statistics
import time

import pytest
from dtj_trainer import simulator
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

pytestmark = pytest.mark.procs
SLOW = 3.0


def config() -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": "fidelity",
            "replicas": 4,
            "algorithm": {"name": "dasgd"},
            "optimizer": {"lr": 0.025, "momentum": 0.9},
            "training": {"steps": 60, "evalEvery": 20},
        }
    )


def real_results() -> list:
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": "0.0012"} for s in range(4)}
    env["0"]["DTJ_SIMULATE_SLOWDOWN"] = str(SLOW)
    job = LocalJob(config(), extra_env=env)
    try:
        for slot in range(4):
            job.start_worker(slot)
        while job.running():
            time.sleep(0.2)
        assert not job.failed(), job.failed()
        return [r for _, r in sorted(job.results().items())]
    finally:
        job.close()


def test_simulated_staleness_matches_real_processes():
    real = real_results()
    sim, _ = simulator.simulate(config(), slowdowns={0: SLOW})
    fast_real = statistics.mean(r.staleness_mean for r in real[1:])
    fast_sim = statistics.mean(r.staleness_mean for r in sim[1:])
    summary = [(r.staleness_mean, r.staleness_max, r.updates_received) for r in real + sim]
    # The slow worker receives stale-free-ish gradients; fast ones get the slow one's late.
    assert fast_real > 1.5 * real[0].staleness_mean, summary
    assert fast_sim == pytest.approx(fast_real, rel=0.3), summary
    assert sim[0].staleness_mean == pytest.approx(real[0].staleness_mean, rel=0.35), summary
    # How many of a fast worker's messages are still in flight at the end depends on
    # which process the scheduler ran last (2 contended cores spread one worker's
    # count over 122-144 in CI), so the fast workers are compared on their mean.
    assert sim[0].updates_received == pytest.approx(real[0].updates_received, rel=0.1), summary
    fast_updates = [statistics.mean(r.updates_received for r in rs[1:]) for rs in (real, sim)]
    assert fast_updates[1] == pytest.approx(fast_updates[0], rel=0.1), summary
    # The worst staleness is a tail: on 2 contended cores (CI runs the e2e tests
    # beside these) a descheduled process shows 22 where it showed 11 alone, so
    # the simulator is held to it from one side only: no staler than the processes.
    for r, s in zip(real, sim, strict=True):
        assert s.staleness_max <= r.staleness_max + 4, summary
