"""When training ends: per-worker rounds, or a job-wide budget spent by all workers."""

from __future__ import annotations

import pytest
from dtj_trainer.config import TrainingSpec
from dtj_trainer.pace import Pace
from pydantic import ValidationError


def training(**kw: object) -> TrainingSpec:
    return TrainingSpec.model_validate(kw)


def test_steps_are_per_worker_rounds_and_default_to_300():
    assert Pace.of(training(), 1000).rounds == 300
    assert Pace.of(training(steps=50), 1000).rounds == 50
    assert not Pace.of(training(steps=50), 1000).budgeted


def test_epochs_count_passes_over_the_training_set():
    pace = Pace.of(training(budget={"epochs": 2.5}), 1000)
    assert pace.budgeted and pace.samples == 2500 and pace.rounds is None


def test_steps_and_budget_exclude_each_other_and_a_budget_needs_an_amount():
    with pytest.raises(ValidationError, match="steps or budget"):
        training(steps=10, budget={"samples": 100})
    with pytest.raises(ValidationError, match="samples or epochs"):
        training(budget={"samples": 100, "epochs": 1})
    with pytest.raises(ValidationError, match="samples, epochs or seconds"):
        training(budget={})


def test_the_budget_is_spent_by_all_workers_together_within_a_round():
    pace = Pace(rounds=None, samples=900, every=10)
    assert not pace.settle(0, 0, 0.0) and pace.next_check == 2  # early: measure soon
    # 4 workers x 8 samples = 32 per round.
    assert not pace.settle(2, 64, 0.2) and pace.next_check == 12
    assert not pace.settle(12, 320, 1.0) and pace.next_check == 22
    # 704 counted, 196 to go at 32 a round: the next sync point comes 7 rounds on.
    assert not pace.settle(22, 320, 2.0) and pace.next_check == 29
    assert pace.settle(29, 224, 2.7)
    assert 900 <= pace.consumed < 900 + 32  # overshoot: less than one round of the job
    assert pace.fraction(29, 2.7) == 1.0


def test_a_time_budget_ends_training_whichever_comes_first():
    pace = Pace(rounds=None, samples=10**9, seconds=60)
    assert not pace.settle(10, 100, 59.0)
    assert pace.settle(20, 100, 60.5)
    assert Pace(rounds=None, seconds=30).fraction(5, 15.0) == 0.5
