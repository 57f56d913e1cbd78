"""allreduce: the DDP-equivalent baseline, bound by the slowest worker."""

from __future__ import annotations

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

    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def state_weight(self) -> float:
        return 1.0

    async def setup(self, local: Local) -> None:
        return None

    async def round(self, local: Local, step: int) -> RoundStats:
        loss = await local.grad()
        if self.t.size == 1:  # alone: the gradient is the mean already
            local.step()
            return RoundStats(loss, local.batch)
        b = float(local.batch)
        packed = torch.cat([local.flat_grad() * b, torch.tensor([b])])
        mean = await self.t.all_reduce_mean(packed)
        local.set_flat_grad(mean[:-1] / mean[-1])
        local.step()
        return RoundStats(loss, local.batch)

    async def finish(self, local: Local) -> float:
        return 1.0
