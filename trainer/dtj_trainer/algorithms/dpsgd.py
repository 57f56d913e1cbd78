"""dpsgd: synchronous decentralized SGD (Lian et al. 2017; Koloskova et al. 2020)."""

from __future__ import annotations

import torch

from .. import topology
from ..config import TopologyName
from ..transport import Transport
from .base import Local, RoundStats


def mix(
    own: int, x: torch.Tensor, received: dict[int, torch.Tensor], weights: dict[int, float]
) -> torch.Tensor:
    """x_i <- sum_j W_ij x_j over the closed neighbourhood."""
    out = x * weights[own]
    for p, xp in received.items():
        out = out + weights[p] * xp
    return out


class DPSGD:
    """Local step, then x_i <- sum_j W_ij x_j with the topology's neighbours.

    Bytes per step per worker are model size x degree, independent of n.
    """

    weights_batches = False
    replicates = False

    def __init__(self, transport: Transport, topology_name: TopologyName) -> None:
        self.t = transport
        self.topology = topology_name

    def state_weight(self) -> float:
        return 1.0

    async def setup(self, local: Local) -> None:
        return None

    async def round(self, local: Local, step: int) -> RoundStats:
        loss = await local.grad()
        local.step()
        w = topology.mixing_weights(self.topology, self.t.size, self.t.rank, step)
        x = local.params()
        received = await self.t.exchange(x, [p for p in w if p != self.t.rank])
        local.set_params(mix(self.t.rank, x, received, w))
        return RoundStats(loss, local.drawn)

    async def finish(self, local: Local) -> float:
        return 1.0
