"""Aggregating worker progress for the job status."""

from __future__ import annotations

from dtj_trainer import progress
from dtj_trainer.metrics import Progress


def test_aggregate_takes_the_slowest_step_mean_loss_and_summed_rate():
    out = progress.aggregate(
        [
            Progress(rank=0, step=100, loss=0.5, samples_per_second=10.0, consensus_distance=0.2),
            Progress(rank=1, step=90, loss=0.3, samples_per_second=30.0, consensus_distance=0.4),
        ]
    )
    assert out["step"] == 90
    assert out["loss"] == "0.4000"
    assert out["samplesPerSecond"] == "40.0"
    assert float(out["consensusDistance"]) == 0.3
    assert progress.aggregate([]) == {}
