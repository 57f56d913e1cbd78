"""Teleportation's k (activeNodes: auto), searched before training by the validation
loss the worker's evaluation reports: successive halving over k in {1, 2, 4, ..., n}."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .algorithms import weighted_average

if TYPE_CHECKING:
    from .loop import Worker


def halving_rungs(candidates: int, budget: int) -> list[int]:
    """Rounds per candidate in each rung of a successive-halving search: rung r trains
    ceil(m / 2^r) candidates for b x 2^r rounds until one is left; b is the largest
    that keeps the total within `budget` (at least 1 round)."""
    alive, mult, cost = candidates, 1, 0
    mults = []
    while alive > 1:
        mults.append(mult)
        cost += alive * mult
        alive, mult = (alive + 1) // 2, mult * 2
    if not mults:
        return []  # one candidate: nothing to compare
    base = max(1, budget // cost)
    return [base * m for m in mults]


async def search_k(w: Worker, budget: int) -> int:
    """Teleportation's k, found within `budget` rounds (the paper's Algorithm 2 finds
    k within 2T iterations in all: this spends <= T before the T rounds of training).

    Successive halving over k in {1, 2, 4, ..., n} (the paper's exact schedule is
    unconfirmed; ALGORITHMS.md): every candidate trains from x0 for b rounds, the
    better half trains again from x0 for 2b, and so on until one is left, with b
    as large as the budget allows (`halving_rungs`). A candidate's score is the mean
    validation loss of the slot models themselves, not of their average: averaging
    hides how far apart the slots are, which is what a large k on a sparse
    topology costs. Every round of every rung is logged in `w.search_log`.
    """
    n = w.transport.size
    alive = [2**j for j in range(n.bit_length()) if 2**j <= n]
    w.search_log = []
    for rounds in halving_rungs(len(alive), budget):
        scores = {}
        for k in alive:
            w.reset()
            weight, _ = await w.run(rounds, k=k)
            own = 0.0
            if weight > 0:
                evaluation = w.scores()
                if "val_loss" not in evaluation:
                    raise ValueError(
                        "teleportation's activeNodes: auto ranks k by validation loss: the "
                        "evaluate function must return val_loss (or set activeNodes)"
                    )
                own = evaluation["val_loss"]
            mean, _ = await weighted_average(torch.tensor([own]), weight, w.transport)
            scores[k] = float(mean[0])
            w.search_log.append({"k": k, "rounds": rounds, "val_loss": scores[k]})
        alive = sorted(alive, key=lambda k: scores[k])[: (len(alive) + 1) // 2]
    w.reset()
    return alive[0]
