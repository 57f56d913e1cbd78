"""allreduce: the DDP-equivalent baseline, bound by the slowest worker (or, with
roundSeconds, by time: each worker contributes what it computed by then)."""

from __future__ import annotations

import time

import torch

from ..transport import Transport
from .base import Local, RoundStats


class AllReduce:
    """Every step all workers apply the same mean gradient.

    The mean is weighted by local batch sizes, sum_i b_i g_i / sum_i b_i, so
    unequal batches (dynamic batching) still give the full-batch gradient
    (averaging p_i g_i and dividing by n would silently shrink the step).
    One collective carries numerator and denominator.
    """

    weights_batches = True  # dynamic batching needs no gradient scaling here
    replicates = True

    def __init__(self, transport: Transport, round_seconds: float | None = None) -> None:
        self.t = transport
        self.round_seconds = round_seconds

    def state_weight(self) -> float:
        return 1.0

    async def setup(self, local: Local) -> None:
        return None

    async def round(self, local: Local, step: int) -> RoundStats:
        if self.round_seconds is not None:
            return await self._timed_round(local, self.round_seconds)
        loss = await local.grad()
        if self.t.size == 1:  # alone: the gradient is the mean already
            local.step()
            return RoundStats(loss, local.drawn)
        b = float(local.drawn)
        packed = torch.cat([local.flat_grad() * b, torch.tensor([b])])
        mean = await self.t.all_reduce_mean(packed)
        local.set_flat_grad(mean[:-1] / mean[-1])
        local.step()
        return RoundStats(loss, local.drawn)

    async def _timed_round(self, local: Local, seconds: float) -> RoundStats:
        """Mini-batches until `seconds` are over (at least one), the last cut to what
        the time left is expected to fit (judged by the one before; none if under an
        eighth of a batch), then one all-reduce of the gradient sums and sample
        counts: the sample-weighted mean over everything the workers computed."""
        start = time.perf_counter()
        total, samples, losses = None, 0, []
        planned = local.batch
        try:
            while True:
                t0 = time.perf_counter()
                losses.append(await local.grad())
                g = local.flat_grad() * local.drawn
                total = g if total is None else total.add_(g)
                samples += local.drawn
                now = time.perf_counter()
                per_sample = (now - t0) / max(local.drawn, 1)
                fits = int((seconds - (now - start)) / max(per_sample, 1e-9))
                if fits < max(1, planned // 8):
                    break
                local.batch = min(planned, fits)
        finally:
            local.batch = planned
        assert total is not None
        packed = torch.cat([total, torch.tensor([float(samples)])])
        mean = packed if self.t.size == 1 else await self.t.all_reduce_mean(packed)
        local.set_flat_grad(mean[:-1] / mean[-1])
        local.step()
        return RoundStats(sum(losses) / len(losses), samples)

    async def finish(self, local: Local) -> float:
        return 1.0
