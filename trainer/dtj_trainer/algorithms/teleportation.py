"""teleportation: k active slots that move between workers (Takezawa & Stich, ICLR 2025)."""

from __future__ import annotations

import random

import torch

from .. import topology
from ..config import TopologyName
from ..transport import Transport
from .base import Local, RoundStats
from .dpsgd import mix


def active_set(n: int, k: int, seed: int, t: int) -> list[int]:
    """V_t: k of the n workers, uniformly without replacement, from a shared seed.

    Every worker computes the same list with no message; slot s is V_t[s].
    """
    return random.Random(f"{seed}/{t}").sample(range(n), k)


class Teleportation:
    """Each round the k slot models teleport to k fresh workers, step, and gossip.

        V_t <- k of n live workers (shared seed)
        for slot s: worker V_{t-1}[s] sends x^s to worker V_t[s]      # teleport
        x^s <- x^s - lr * grad F_{V_t[s]}(x^s)                        # local data
        x^s <- sum_r (W_k)_{sr} x^r                                   # gossip among active

    All slots start at x0, which every worker already holds (same seed), so
    round 0 needs no teleport. W_k is the `topology` (ring by default; the
    paper's choice is unconfirmed) on the k active workers. The worker's own
    optimizer state does not travel with the slot: use plain SGD (momentum 0).
    """

    weights_batches = False
    replicates = False

    def __init__(self, transport: Transport, *, k: int, topology: TopologyName, seed: int) -> None:
        if not 1 <= k <= transport.size:
            raise ValueError(f"teleportation needs 1 <= k <= n, got k={k}, n={transport.size}")
        self.t, self.k, self.topology, self.seed = transport, k, topology, seed
        self.holding = False  # does this worker hold a slot's current model?

    def state_weight(self) -> float:
        return 1.0 if self.holding else 0.0

    async def setup(self, local: Local) -> None:
        return None

    async def round(self, local: Local, step: int) -> RoundStats:
        me, n = self.t.rank, self.t.size
        cur = active_set(n, self.k, self.seed, step)
        prev = active_set(n, self.k, self.seed, step - 1) if step > 0 else cur
        x = local.params()
        send = recv = None
        if me in prev and cur[prev.index(me)] != me:
            send = (cur[prev.index(me)], x)
        if me in cur and prev[cur.index(me)] != me:
            recv = (prev[cur.index(me)], torch.empty_like(x))
        if send is not None or recv is not None:
            arrived = await self.t.transfer(send, recv)
            if arrived is not None:
                local.set_params(arrived)
        self.holding = me in cur
        if not self.holding:
            return RoundStats(None, 0)
        slot = cur.index(me)
        loss = await local.grad()
        local.step()
        w = topology.mixing_weights(self.topology, self.k, slot, step)
        x = local.params()
        received = await self.t.exchange(x, [cur[s] for s in w if s != slot])
        by_slot = {cur.index(p): xp for p, xp in received.items()}
        local.set_params(mix(slot, x, by_slot, w))
        return RoundStats(loss, local.drawn)

    async def finish(self, local: Local) -> float:
        return 1.0 if self.holding else 0.0
