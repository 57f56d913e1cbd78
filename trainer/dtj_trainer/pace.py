"""When training ends: after a number of rounds per worker, or when the job's budget is spent.

A budget (`training.budget`) counts the samples of all workers together, so
fast workers do more of the work and the job does not last as long as its
slowest worker takes for an equal share. Workers compare notes at sync
points every `every` rounds: synchronous methods in one small all-reduce
(all see the same numbers, so all stop at the same round, and the next sync
point is brought forward so that the budget is overshot by less than a
round); asynchronous methods through a counter in the job's store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainingSpec


@dataclass
class Pace:
    rounds: int | None  # per-worker rounds (no budget)
    samples: int | None = None  # job-wide sample budget
    seconds: float | None = None  # job-wide wall-clock budget
    every: int = 10  # rounds between sync points
    warmup: int = 2  # ... but the first one after a (re)start comes after this many
    consumed: int = 0  # job-wide samples counted so far
    unreported: int = 0  # this worker's samples since it last counted them
    next_check: int = 0  # the round at which the next sync point falls
    last_check: int = 0

    @classmethod
    def of(cls, training: TrainingSpec, train_size: int) -> Pace:
        budget = training.budget
        if budget is None:
            return cls(rounds=training.rounds)
        samples = budget.samples
        if budget.epochs is not None:
            samples = max(1, math.ceil(budget.epochs * train_size))
        return cls(rounds=None, samples=samples, seconds=budget.seconds)

    @property
    def budgeted(self) -> bool:
        return self.rounds is None

    def fraction(self, step: int, elapsed: float) -> float:
        """How much of the training is done (0-1), for progress displays."""
        if self.rounds is not None:
            return min(1.0, step / self.rounds)
        parts = []
        if self.samples is not None:
            parts.append(self.consumed / self.samples)
        if self.seconds is not None:
            parts.append(elapsed / self.seconds)
        return min(1.0, max(parts))

    def settle(self, step: int, new_samples: int, elapsed: float) -> bool:
        """A sync point at round `step`: count the job's new samples; True when the budget
        is spent. Schedules the next sync point (sooner when the end is near)."""
        self.consumed += new_samples
        rounds = max(1, step - self.last_check)
        # Right after a start or a membership change: measure soon, re-plan soon.
        gap = self.warmup if step == self.last_check else self.every
        self.last_check = step
        if self.samples is not None and new_samples > 0:
            per_round = new_samples / rounds
            gap = min(gap, max(1, math.ceil((self.samples - self.consumed) / per_round)))
        self.next_check = step + gap
        return self.spent(elapsed)

    def spent(self, elapsed: float) -> bool:
        if self.samples is not None and self.consumed >= self.samples:
            return True
        return self.seconds is not None and elapsed >= self.seconds
