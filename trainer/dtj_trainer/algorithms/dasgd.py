"""dasgd: decentralized asynchronous SGD (Tosi & Theobald, arXiv:2309.03754)."""

from __future__ import annotations

import torch

from .. import topology
from ..config import AlgorithmSpec
from ..transport import Transport
from .base import Local, RoundStats


class DASGD:
    """Apply received (stale) gradients, then compute, apply and send one's own.

    Staleness of a received gradient = the updates this worker had applied
    (when it opened its inbox) that the sender's model had not seen when it
    computed the gradient. Each gradient carries its sender's version vector
    (how many gradients of each worker its model contained), so the count is
    exact, not a guess from clocks. Gradients staler than `stalenessBound`
    are dropped: the truncation the analysis motivates, since the rate
    degrades with the average staleness. Received gradients are applied as
    plain SGD steps (x <- x - lr g, as in the paper); the worker's own step
    uses its optimizer. Fan-out is all peers (the reference code) or the
    topology's neighbours.
    """

    def __init__(self, transport: Transport, spec: AlgorithmSpec, *, seed: int) -> None:
        self.t = transport
        self.bound = spec.staleness_bound
        if spec.fanout == "all":
            self.peers = [r for r in range(transport.size) if r != transport.rank]
        else:
            self.peers = topology.neighbours(spec.topology, transport.size, transport.rank)
        self.seen = torch.zeros(transport.size)  # gradients of each worker applied here
        self.dropped = 0

    async def setup(self, local: Local) -> None:
        await self.t.open_inbox(local.params().numel() + self.t.size)

    async def round(self, local: Local, step: int) -> RoundStats:
        dropped = self.dropped
        stale = self._apply_received(local, self.t.inbox())
        version = self.seen.clone()
        loss = local.grad()
        g = local.flat_grad()
        local.step()
        self.seen[self.t.rank] += 1
        payload = torch.cat([g, version])
        for peer in self.peers:
            self.t.post(payload, peer)
        mean = sum(stale) / len(stale) if stale else None
        return RoundStats(loss, local.batch, mean, tuple(stale), self.dropped - dropped)

    async def finish(self, local: Local) -> float:
        self._apply_received(local, await self.t.drain())
        return 1.0

    def _apply_received(self, local: Local, msgs: list[tuple[int, torch.Tensor]]) -> list[int]:
        """Apply the fresh enough gradients; the staleness of each message received."""
        if not msgs:
            return []
        n = self.t.size
        x = local.params()
        now = self.seen.clone()
        seen = []
        for sender, m in msgs:
            g, version = m[:-n], m[-n:]
            stale = int((now - version).clamp(min=0).sum())
            seen.append(stale)
            if stale > self.bound:
                self.dropped += 1
                continue
            x = x - local.lr * g
            self.seen[sender] += 1
        local.set_params(x)
        return seen
