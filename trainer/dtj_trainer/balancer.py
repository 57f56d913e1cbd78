"""Dynamic batch allocation: fast workers take more of each round's samples.

A synchronous round lasts as long as its slowest worker's compute. Giving
each worker a local batch proportional to its measured throughput makes
everyone's compute take about the same time, so nobody waits
(ALGORITHMS.md; arXiv:2110.08941; Tyagi & Sharma 2020):

    s_i  = samples per second of compute on worker i (an EMA; waiting excluded)
    p_i  = (1 - beta) p_i + beta s_i / sum_j s_j          damped share

Damping filters noise (jittery steps); a change beyond `jump` (25%) in a
worker's speed or share is a real one (a node slowed down, a neighbour's job
started) and is taken at once, so the plan follows it within a re-plan or two
instead of closing the gap by halves.
    b_i  = p_i B, clamped to [minPerWorker, maxPerWorker], sum b_i = B kept

The update stays the unbiased sample-weighted mean of the workers' gradients,
sum_i b_i g_i / sum_i b_i (g_i: the mean gradient of worker i's b_i samples):
each worker scales its gradient by n b_i / B before the method averages with
equal weights (all-reduce, or a doubly-stochastic gossip step that keeps the
mean). The paper's code averages p_i g_i and divides by n again, which
silently divides the step size by n; `gradient_scales` is where that bug
would live, and the tests check it against the full-batch gradient.

Pure functions and a small state holder: the exchange of measured speeds is
the training loop's business (a collective for synchronous methods, the
job's store for asynchronous ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import BatchingSpec


def allocate(speeds: Sequence[float], total: int, low: int, high: int) -> list[int]:
    """Integer batch sizes proportional to `speeds`, each in [low, high], summing to
    `total` (or to the nearest sum the bounds allow)."""
    n = len(speeds)
    if n == 0:
        return []
    total = min(max(total, n * low), n * high)

    def clamped(scale: float) -> list[float]:
        return [min(max(scale * v, low), high) for v in speeds]

    # The sum of the clamped proportional shares grows with the scale: bisect for the
    # scale that gives `total` (the clamped workers' remainder goes to the others).
    lo_scale, hi_scale = 0.0, high / min(speeds)
    for _ in range(100):
        mid = (lo_scale + hi_scale) / 2
        if sum(clamped(mid)) < total:
            lo_scale = mid
        else:
            hi_scale = mid
    exact = clamped(hi_scale)
    exact = [v * total / sum(exact) for v in exact]  # float error only
    # Largest remainder: integers that keep the total.
    out = [min(max(int(v), low), high) for v in exact]
    order = sorted(range(n), key=lambda i: exact[i] - out[i], reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def gradient_scales(batches: Sequence[int]) -> list[float]:
    """Factor each worker applies to its mean gradient so that an equal-weight average
    of the scaled gradients is the sample-weighted mean: n b_i / sum_j b_j."""
    total = sum(batches)
    return [len(batches) * b / total for b in batches]


def target_total(spec: BatchingSpec, members: int) -> int:
    """Samples per round: globalBatch when set, else perWorker for each member."""
    return spec.global_batch or spec.per_worker * members


@dataclass
class Balancer:
    """One worker's view of the plan: its measured speed and everyone's batch sizes.

    `observe` records this worker's compute; `replan` takes every member's
    speed (all members compute the same plan from the same numbers)."""

    spec: BatchingSpec
    beta: float = 0.5  # damping: how far one re-plan moves the shares
    smoothing: float = 0.5  # EMA weight of the newest measurement
    jump: float = 0.25  # a relative change beyond this is taken whole, not damped
    seconds_per_sample: float | None = None
    shares: list[float] = field(default_factory=list)
    measured: bool = False  # every member's speed has been measured once
    batches: list[int] = field(default_factory=list)
    _seconds: float = 0.0
    _samples: int = 0

    def observe(self, compute_seconds: float, samples: int) -> None:
        """Compute time of one local step (forward, backward, modelled compute)."""
        self._seconds += compute_seconds
        self._samples += samples

    def speed(self) -> float:
        """This worker's samples per second (the EMA of what `observe` saw), or 0
        before any measurement: the plan then uses the hints."""
        if self._samples:
            latest = self._seconds / self._samples
            old = self.seconds_per_sample
            a = self.smoothing
            if old is None or abs(latest / old - 1) > self.jump:  # a change, not noise
                self.seconds_per_sample = latest
            else:
                self.seconds_per_sample = a * latest + (1 - a) * old
            self._seconds, self._samples = 0.0, 0
        return 0.0 if not self.seconds_per_sample else 1.0 / self.seconds_per_sample

    def start(self, hints: Sequence[float]) -> list[int]:
        """The first plan of a generation, from the members' hints (pool speeds)."""
        self.shares = [h / sum(hints) for h in hints]
        self.measured = False
        return self._plan()

    def replan(self, speeds: Sequence[float]) -> list[int]:
        """The next plan from every member's measured speed (0 = not measured yet:
        that member keeps its share)."""
        n = len(speeds)
        if len(self.shares) != n:
            self.shares = [1.0 / n] * n
        measured = [s for s in speeds if s > 0]
        # The first measurements replace the hints outright; later ones are damped,
        # unless a share is to move by more than `jump` (a real change of speed).
        first = not self.measured
        self.measured = self.measured or len(measured) == n
        if measured:
            # Unmeasured members keep their share of the measured members' total.
            known = sum(p for p, s in zip(self.shares, speeds, strict=True) if s > 0)
            total = sum(measured)
            target = [
                known * s / total if s > 0 else p for p, s in zip(self.shares, speeds, strict=True)
            ]
            moved = any(
                abs(t / p - 1) > self.jump for p, t in zip(self.shares, target, strict=True) if p
            )
            beta = 1.0 if first or moved else self.beta
            self.shares = [
                (1 - beta) * p + beta * t for p, t in zip(self.shares, target, strict=True)
            ]
        return self._plan()

    def _plan(self) -> list[int]:
        n = len(self.shares)
        total = target_total(self.spec, n)
        self.batches = allocate(
            self.shares, total, self.spec.min_per_worker, self.spec.max_per_worker
        )
        return self.batches
