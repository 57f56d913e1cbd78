"""gosgd: fully asynchronous sum-weight gossip (Blot et al., arXiv:1611.09726)."""

from __future__ import annotations

import random

import torch

from ..transport import Message, Transport
from .base import Local, RoundStats


def merge(x: torch.Tensor, a: float, msgs: list[Message]) -> tuple[torch.Tensor, float]:
    """x_i <- (a_i x_i + a_s x_s) / (a_i + a_s); a_i <- a_i + a_s, for each (x_s, a_s)."""
    for _, m in msgs:
        xs, a_s = m[:-1], float(m[-1])
        x = (a * x + a_s * xs) / (a + a_s)
        a += a_s
    return x, a


class GoSGD:
    """Drain the inbox, take a local step, then with probability p push half the weight.

    Each worker keeps a scalar weight a_i (all start at 1/n, so sum a_i = 1
    is invariant: a push halves a_i and sends that half along with x_i). No
    worker ever waits for another. A membership change syncs every member to
    the sum-weight average of the models (the leavers' and in-flight weight
    included through the hand-offs, or renormalised away), and the new
    generation's GoSGD starts again at 1/n each: the sum is 1 again.
    """

    weights_batches = False
    replicates = False

    def __init__(self, transport: Transport, p: float, *, seed: int) -> None:
        self.t, self.p = transport, p
        self.a = 1.0 / transport.size
        self._rng = random.Random(seed * 7919 + transport.rank)

    def state_weight(self) -> float:
        return self.a

    async def setup(self, local: Local) -> None:
        await self.t.open_inbox(local.params().numel() + 1)

    async def round(self, local: Local, step: int) -> RoundStats:
        self._merge(local, self.t.inbox())
        loss = await local.grad()
        local.step()
        if self.t.size > 1 and self._rng.random() < self.p:
            peer = self._rng.choice([r for r in range(self.t.size) if r != self.t.rank])
            self.a /= 2
            self.t.post(torch.cat([local.params(), torch.tensor([self.a])]), peer)
        return RoundStats(loss, local.drawn)

    async def finish(self, local: Local) -> float:
        self._merge(local, await self.t.drain())
        return self.a

    def _merge(self, local: Local, msgs: list[Message]) -> None:
        if msgs:
            x, self.a = merge(local.params(), self.a, msgs)
            local.set_params(x)
