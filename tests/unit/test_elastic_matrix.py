"""The elastic invariant matrix: every method x every membership event, on the simulator.

Each scenario trains 4 virtual workers, plays one event (thaw: after a freeze),
and checks after every generation change and at the end what must hold,
whatever the accuracy (issue 18):
- a state sync gives every member the average of what the members held,
  weighted by what each holds (GoSGD's weight, teleportation's 0 when idle; 0
  for joiners and for a worker that missed generations), hand-offs included;
- synchronous members are in step after a sync;
- allreduce replicas are identical: parameters, buffers, optimizer state;
- GoSGD's weights sum to 1;
- the job's sample count is what was trained (less a crashed worker's uncounted
  rounds), and the budget is trained after any teleportation search;
- the data ledger: each sample once per epoch, except in chunks it reissued.
The numbers of scenarios and checks are printed in pytest's summary (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
import torch
from dtj_trainer import ksearch
from dtj_trainer.config import TrainerConfig
from dtj_trainer.sim_membership import MembershipSim, Sync

METHODS: dict[str, dict[str, Any]] = {
    "allreduce": {"name": "allreduce"},
    "dpsgd-ring": {"name": "dpsgd", "topology": "ring"},
    "dpsgd-one-peer-exponential": {"name": "dpsgd", "topology": "one-peer-exponential"},
    "gosgd": {"name": "gosgd", "gossipProbability": 0.6},
    "dasgd": {"name": "dasgd"},
    "teleportation-k2": {"name": "teleportation", "activeNodes": 2},
    "teleportation-auto": {"name": "teleportation", "activeNodes": "auto"},
}
SCENARIOS: dict[str, list[str]] = {
    "leave": ["leave"],
    "crash": ["crash"],
    "freeze-thaw": ["freeze", "thaw"],
    "join": ["crash", "join"],  # a replacement for a lost slot
    "scale-up": ["scale_up"],
    "scale-down": ["scale_down"],
    "coordinator-loss": ["coordinator"],
}
BUDGET = 6_000
BATCH = 16
CHECKS: collections.Counter[str] = collections.Counter()
MATRIX_PROPERTY = "elastic_invariant_checks"


def config(method: dict[str, Any]) -> TrainerConfig:
    momentum = 0.0 if method["name"] == "teleportation" else 0.9
    return TrainerConfig.model_validate(
        {
            "job": "matrix",
            "replicas": 4,
            "algorithm": method,
            "optimizer": {"lr": 0.05, "momentum": momentum},
            "batching": {"perWorker": BATCH},
            "training": {"model": "mlp", "budget": {"samples": BUDGET}, "evalEvery": 1000},
        }
    )


def check(name: str, ok: bool, detail: Any = "") -> None:
    CHECKS[name] += 1
    assert ok, f"{name}: {detail}"


def check_sync(sim: MembershipSim, sync: Sync) -> None:
    members = sync.members
    if sync.expected is not None:
        for w in members:
            check(
                "sync is the held-weighted average",
                torch.allclose(w.local.state_vector(), sync.expected, atol=1e-5),
                (sync.event, w.slot),
            )
    if not sim.asynchronous:
        steps = {w.current_step for w in members}
        check("synchronous members in step", len(steps) == 1, steps)
    check_replicas(sim)


def check_replicas(sim: MembershipSim) -> None:
    if sim.cfg.algorithm.name != "allreduce":
        return
    first = sim.members[0]
    for w in sim.members[1:]:
        same_params = torch.equal(w.local.params(), first.local.params())
        check("allreduce replicas: parameters", same_params, w.slot)
        mine = [w.local.optimizer.state[p] for p in w.local.model.parameters()]
        ref = [first.local.optimizer.state[p] for p in first.local.model.parameters()]
        same_state = all(
            torch.equal(a["momentum_buffer"], b["momentum_buffer"])
            for a, b in zip(mine, ref, strict=True)
        ) and len(mine) == len(ref)
        check("allreduce replicas: optimizer state", same_state, w.slot)
        same_buffers = all(
            torch.equal(a, b)
            for a, b in zip(w.local.model.buffers(), first.local.model.buffers(), strict=True)
        )
        check("allreduce replicas: buffers", same_buffers, w.slot)


def check_after_training(sim: MembershipSim) -> None:
    check_replicas(sim)
    if sim.cfg.algorithm.name == "gosgd":
        total = sum(w.algo.state_weight() for w in sim.members)  # type: ignore[union-attr]
        check("gosgd weights sum to 1", abs(total - 1.0) < 1e-5, total)


async def play(method: str, events: list[str]) -> MembershipSim:
    sim = MembershipSim(config(METHODS[method]))
    await sim.start()
    if METHODS[method].get("activeNodes") == "auto":  # the k search first, outside the budget
        k = await asyncio.gather(*(ksearch.search_k(w, 8) for w in sim.members))
        for w, found in zip(sim.members, k, strict=True):
            w.k = found
        sim.trained = dict.fromkeys(sim.trained, 0)
    await sim.train(6)
    check_after_training(sim)
    for kind in events:
        check_sync(sim, await sim.event(kind))  # type: ignore[arg-type]
        await sim.train(4)
        check_after_training(sim)
    await sim.train_to_budget()
    check_after_training(sim)
    count, trained = sim.job_count(), sim.samples_trained()
    check("job count = samples trained - crash loss", count == trained - sim.lost, (count, trained))
    overshoot = len(sim.members) * BATCH * (10 if sim.asynchronous else 1)
    check("budget trained, overshoot bounded", BUDGET <= count <= BUDGET + overshoot, count)
    check_ledger(sim)
    return sim


def check_ledger(sim: MembershipSim) -> None:
    """The data ledger, from the (epoch, sample) pairs each worker committed (departed
    and crashed ones included): a sample repeats within an epoch only inside a chunk
    the ledger reissued (and counted); every epoch before the last two (the ones still
    being trained) holds every sample."""
    assert sim.service is not None and sim.service.book is not None
    book = sim.service.book
    per_epoch: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for pairs in sim.indices.values():
        for epoch, sample in pairs:
            per_epoch[epoch][sample] += 1
    repeated = sum(n - 1 for c in per_epoch.values() for n in c.values())
    check("ledger: repeats only in reissued chunks", repeated <= book.reissued, repeated)
    chunk = book.plan.length(0)
    kills = sum(1 for w in sim.departed if w not in sim.members) + len(sim.frozen) + 1
    check("ledger: at most a chunk reissued per drop", book.reissued <= kills * chunk)
    last = max(per_epoch)
    for epoch in range(last - 1):
        check("ledger: every sample in each past epoch", len(per_epoch[epoch]) == book.plan.size)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", list(METHODS))
def test_invariants_hold_through_the_event(
    method: str, scenario: str, record_property: Any
) -> None:
    before = sum(CHECKS.values())
    asyncio.run(play(method, SCENARIOS[scenario]))
    # tests/conftest.py adds these up and prints the matrix's size after the run.
    record_property(MATRIX_PROPERTY, sum(CHECKS.values()) - before)
