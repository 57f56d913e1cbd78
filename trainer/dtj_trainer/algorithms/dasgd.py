"""dasgd: decentralized asynchronous SGD (Tosi & Theobald, arXiv:2309.03754)."""

from __future__ import annotations

import torch

from ..config import AlgorithmSpec
from ..transport import Transport
from .base import Local, RoundStats


class DASGD:
    """Every gradient, one's own and the peers' (stale), goes through one update rule.

    A round applies what arrived (their sum, in one optimizer step), then
    computes its own gradient on the updated model and applies it, so momentum
    and weight decay treat a peer's gradient exactly like one's own (as the
    paper's nodes apply each gradient they hold with the same rule); then it
    sends its gradient with the version vector read with the model.

    Staleness of a received gradient = the updates this worker had processed
    that the sender had not processed when it computed the gradient. Each
    gradient carries its sender's version vector (how many gradients of each
    worker it had processed, applied or dropped), so the count is exact, not
    a guess from clocks, and it measures delay: a dropped gradient counts as
    processed, so drops do not make every later message look staler. A
    gradient is dropped when it misses more than `stalenessBound`
    rounds of the others' updates (stalenessBound x (n - 1) updates: with n
    workers each round of delay adds n - 1), the truncation the analysis
    motivates; drops are counted (dtj_worker_dropped_updates_total). Every
    gradient goes to all peers, as in the reference code: that is what keeps
    the models together, since no parameters travel. (A neighbours-only
    fan-out was removed: with gradients alone and no model mixing, the
    workers' models drift apart without bound.) Every gradient, own or
    received, goes through the optimizer: n workers apply ~n a round, so each
    is scaled by 1/n (`scaleGradients`, the default; off, scale lr yourself).
    """

    weights_batches = False
    replicates = False

    def __init__(self, transport: Transport, spec: AlgorithmSpec, *, seed: int) -> None:
        self.t = transport
        self.bound = spec.staleness_bound * max(transport.size - 1, 1)
        self.spec = spec
        # Each worker applies ~n gradients a round: 1/n keeps the job's step at lr.
        self.scale = 1.0 / transport.size if spec.scale_gradients else 1.0
        self.seen = torch.zeros(transport.size)  # gradients of each worker applied here
        self.dropped = 0

    def peers(self) -> list[int]:
        return [r for r in range(self.t.size) if r != self.t.rank]

    def state_weight(self) -> float:
        return 1.0

    async def setup(self, local: Local) -> None:
        await self.t.open_inbox(local.params().numel() + self.t.size)

    async def round(self, local: Local, step: int) -> RoundStats:
        """ALGORITHMS.md's order: apply what arrived, then read the model (recording the
        version vector at that moment), compute the own gradient on it and apply it."""
        dropped = self.dropped
        received, stale = self._fresh(self.t.inbox())
        if received is not None:
            local.set_flat_grad(received * self.scale)
            local.step()
        version = self.seen.clone()  # what the model this gradient is computed on has seen
        loss = await local.grad()
        g = local.flat_grad()
        if self.scale != 1.0:
            local.set_flat_grad(g * self.scale)
        local.step()
        self.seen[self.t.rank] += 1
        payload = torch.cat([g, version])
        for peer in self.peers():
            self.t.post(payload, peer)
        mean = sum(stale) / len(stale) if stale else None
        return RoundStats(loss, local.drawn, mean, tuple(stale), self.dropped - dropped)

    async def finish(self, local: Local) -> float:
        received, _ = self._fresh(await self.t.drain())
        if received is not None:
            local.set_flat_grad(received * self.scale)
            local.step()
        return 1.0

    def _fresh(self, msgs: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor | None, list[int]]:
        """The sum of the received gradients fresh enough to apply (None if none), and
        the staleness of every message received (dropped ones included)."""
        n = self.t.size
        now = self.seen.clone()
        total: torch.Tensor | None = None
        staleness = []
        for sender, m in msgs:
            g, version = m[:-n], m[-n:]
            stale = int((now - version).clamp(min=0).sum())
            staleness.append(stale)
            # Processed, applied or not: a dropped gradient must not count as an update
            # the others "have not seen yet" forever, or every later message from this
            # worker looks staler and staler and drops cascade (seen with a 5x slower one).
            self.seen[sender] += 1
            if stale > self.bound:
                self.dropped += 1
                continue
            total = g if total is None else total + g
        return total, staleness
