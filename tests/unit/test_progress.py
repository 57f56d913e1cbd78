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


def test_a_user_loops_result_is_the_mean_of_what_the_workers_reported_without_accuracy():
    from dtj_trainer.config import TrainerConfig
    from dtj_trainer.launcher import progress_line
    from dtj_trainer.metrics import Result

    results = [
        Result(100, None, None, 0.0, 1.0, metrics={"val_loss": 2.0, "perplexity": 7.0}),
        Result(100, None, None, 0.0, 1.0, metrics={"val_loss": 3.0}),
    ]
    summary = progress.summarize_results(results)
    assert summary == {
        "steps": 100,
        "workers": 2,
        "metrics": {"perplexity": "7", "val_loss": "2.5"},
    }
    cfg = TrainerConfig(job="j", replicas=2)
    reports = [
        Progress(rank=r, step=50, loss=1.0, samples_per_second=10, metrics={"val_loss": v})
        for r, v in ((0, 2.0), (1, 4.0))
    ]
    assert "val_loss 3  " in progress_line(cfg, reports)
    assert "test acc" not in progress_line(cfg, reports)
