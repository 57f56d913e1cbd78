"""Membership events on the simulator: who trains together changes between rounds.

The real elastic path is a store-backed registrar, heartbeats and gloo groups
rebuilt per generation (membership.py, `Elastic.regroup`); what a generation
change does to the *training state* is `Elastic.sync_state`, and that is what
this module drives: each event ends a generation, hands the members the
endpoints of a new `SimWorld` and runs every member's real state sync, with
an in-process store for the hand-offs. Deterministic and in seconds, so every
method can be played through every event (tests/unit/test_elastic_matrix.py).

Events: `leave` (SIGTERM: hand-off), `crash` (SIGKILL: nothing handed off),
`freeze`/`thaw` (dropped while stalled, back later with a stale model),
`join` (a replacement: x0, step 0), `scale_up`/`scale_down` (several joins or
leaves at once), `coordinator` (a new, empty store, re-seeded by the members).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from . import ledger
from .config import ASYNC_ALGORITHMS, TrainerConfig
from .data import LedgerSampler
from .elastic import SAMPLES_KEY, Elastic, Left, reseed
from .loop import Worker
from .membership import Generation
from .simulator import SimWorld

EventKind = Literal[
    "leave", "crash", "freeze", "thaw", "join", "scale_up", "scale_down", "coordinator"
]
EVENTS: tuple[EventKind, ...] = (
    "leave",
    "crash",
    "freeze",
    "thaw",
    "join",
    "scale_up",
    "scale_down",
    "coordinator",
)


@dataclass
class _Member:
    """The membership side a worker's leave() calls: an id, nothing else to do here."""

    id: str

    def leave(self) -> None:
        return None


@dataclass
class Sync:
    """What one generation change did: who synced, and what the sync should give."""

    event: str
    members: list[Worker]
    expected: torch.Tensor | None  # the weighted average of what the members held


@dataclass
class MembershipSim:
    """A job of virtual workers whose membership changes between training phases."""

    cfg: TrainerConfig
    say: Callable[[str], None] = lambda _m: None
    store: Any = field(default_factory=dist.HashStore)
    members: list[Worker] = field(default_factory=list)
    frozen: list[Worker] = field(default_factory=list)
    departed: list[Worker] = field(default_factory=list)  # left or crashed, for good
    generation: int = -1
    trained: dict[int, int] = field(default_factory=dict)  # id(worker) -> samples computed
    # id(worker) -> the (epoch, sample) pairs it trained (committed rounds), for the
    # ledger's check
    indices: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    service: ledger.Service | None = None  # the coordinator's data ledger
    lost: int = 0  # samples a crash took with it (trained, never counted)
    _incarnation: int = 0

    @property
    def asynchronous(self) -> bool:
        return self.cfg.algorithm.name in ASYNC_ALGORITHMS

    def _new_service(self) -> ledger.Service:
        live = lambda: [elastic_of(w).member.id for w in self.members]  # noqa: E731
        self.service = ledger.Service(self.store, members=live, log=self.say)
        return self.service

    def _pump(self) -> None:
        assert self.service is not None
        self.service.step()

    def _new_worker(self, slot: int, world: SimWorld, rank: int) -> Worker:
        self._incarnation += 1
        if self.service is None:
            self._new_service()
        el = Elastic(
            member=_Member(f"{slot}.{self._incarnation}"),  # type: ignore[arg-type]
            store=self.store,
            connect=None,  # type: ignore[arg-type]  # the harness hands out endpoints
            generation=Generation(-1, ()),
            timeout=5.0,
            say=self.say,
            pump=self._pump,
        )
        w = Worker.build(self.cfg, world.endpoints[rank], slot=slot, membership=el)
        self.trained[id(w)] = 0
        self.indices[id(w)] = []
        if isinstance(w.local.sampler, LedgerSampler):
            self._record(w, w.local.sampler)
        grad = w.local.grad

        async def counted() -> float:  # ground truth: every sample any worker computed on
            self.trained[id(w)] += w.local.batch
            return await grad()

        w.local.grad = counted  # type: ignore[method-assign]
        return w

    def _record(self, w: Worker, sampler: LedgerSampler) -> None:
        """Ground truth for the ledger: the (epoch, sample) pairs of every committed round."""
        seen = self.indices[id(w)]
        plan = sampler.reader.plan

        def committed(parts: list[ledger.Item]) -> None:
            for item in parts:
                seen.extend((item[0], int(i)) for i in plan.samples(item))

        sampler.reader.on_commit = committed

    def _world(self, n: int) -> SimWorld:
        return SimWorld(n, virtual_time=self.asynchronous, seed=self.cfg.training.seed)

    async def start(self, n: int | None = None) -> Sync:
        n = self.cfg.replicas if n is None else n
        world = self._world(n)
        self.members = [self._new_worker(s, world, s) for s in range(n)]
        return await self._regenerate("start", world, departed=[])

    async def train(self, rounds: int) -> None:
        """Every member trains `rounds` more rounds (its own count: asynchronous
        members may be at different steps)."""
        self._fresh_clocks()
        await asyncio.gather(*(w.run(w.current_step + rounds) for w in self.members))

    async def train_to_budget(self) -> None:
        """Every member trains until the job's budget is spent (cfg.training.budget)."""
        self._fresh_clocks()
        await asyncio.gather(*(w.run(None) for w in self.members))

    def _fresh_clocks(self) -> None:
        """A phase of an asynchronous method ends in a drain that retires its world's
        clocks: the next phase runs on a new one (same members, nothing in flight)."""
        if self.asynchronous:
            world = self._world(len(self.members))
            for rank, w in enumerate(self.members):
                w.transport = world.endpoints[rank]

    def expected_average(self, handoffs: list[Worker]) -> torch.Tensor | None:
        """What a correct sync gives, computed here from the members' own states: the
        average of the current members' and the hand-offs' models weighted by what the
        method says each holds; joiners and stale returners weigh 0."""
        current = max(elastic_of(w).synced_at for w in self.members)
        total, acc = 0.0, None
        for w in self.members + handoffs:
            el = elastic_of(w)
            if w.current_step == 0 or w.algo is None or el.synced_at != current:
                continue
            weight = w.algo.state_weight()
            x = w.local.state_vector() * weight
            acc = x if acc is None else acc + x
            total += weight
        return None if acc is None or total == 0 else acc / total

    async def event(self, kind: EventKind, slot: int | None = None) -> Sync:
        """Play one event; returns the sync it caused (the members after it)."""
        leavers: list[Worker] = []
        if kind in ("leave", "scale_down"):
            count = 1 if kind == "leave" else 2
            chosen = [w for w in self.members if slot is None or w.slot == slot][-count:]
            for w in chosen:
                with _expect(Left):
                    await elastic_of(w).leave(w)  # the real hand-off: its state into the store
                self.members.remove(w)
                self.departed.append(w)
                leavers.append(w)
        elif kind == "crash":
            w = next(w for w in reversed(self.members) if slot is None or w.slot == slot)
            self.members.remove(w)
            self.departed.append(w)
            self.lost += w.pace.unreported  # trained since it last counted: gone with it
            self._drop(w)  # the registrar dropped it: its leases go back
        elif kind == "freeze":
            w = next(w for w in reversed(self.members) if slot is None or w.slot == slot)
            self.members.remove(w)
            self.frozen.append(w)
            self._drop(w)
        elif kind == "thaw":
            w = self.frozen.pop(0)
            self.members.append(w)
        elif kind in ("join", "scale_up"):
            used = {w.slot for w in self.members + self.frozen}
            free = [s for s in range(self.cfg.replicas + 2) if s not in used]
            for s in free[: 1 if kind == "join" else 2]:
                joiner = self._new_worker(s, self._world(1), 0)
                self.members.append(joiner)
        elif kind == "coordinator":
            self.store = dist.HashStore()  # the replacement's store is empty
            self._new_service()
            for w in self.members + self.frozen:
                elastic_of(w).store = self.store
                reseed(w, self.store)
                w.local.sampler.reseed(now=True)
        self.members.sort(key=lambda w: w.slot)
        expected = self.expected_average(leavers)
        departed = [elastic_of(w).member.id for w in leavers]
        return await self._regenerate(kind, self._world(len(self.members)), departed, expected)

    async def _regenerate(
        self,
        event: str,
        world: SimWorld,
        departed: list[str],
        expected: torch.Tensor | None = None,
    ) -> Sync:
        self.generation += 1
        ids = tuple(elastic_of(w).member.id for w in self.members)
        for rank, w in enumerate(self.members):
            w.transport = world.endpoints[rank]
        await asyncio.gather(*(elastic_of(w).sync_state(w, departed) for w in self.members))
        for w in self.members:
            el = elastic_of(w)
            el.generation = Generation(self.generation, ids)
            el.synced, el.synced_at = ids, self.generation
            w.algo = w.make_algorithm(len(self.members))
        self.say(
            f"{event}: generation {self.generation} with slots {[w.slot for w in self.members]}"
        )
        return Sync(event, list(self.members), expected)

    def _drop(self, w: Worker) -> None:
        ledger.submit(self.store, {"op": "drop", "m": elastic_of(w).member.id})
        self._pump()

    def job_count(self) -> int:
        """The job's sample count: synchronous members agree on it in their notes;
        asynchronous ones keep it in the coordinator's store."""
        if self.asynchronous:
            return int(self.store.add(SAMPLES_KEY, 0))
        return max(w.pace.consumed for w in self.members)

    def samples_trained(self) -> int:
        return sum(self.trained.values())


def elastic_of(w: Worker) -> Elastic:
    """The elastic membership of a worker of this harness."""
    assert isinstance(w.membership, Elastic)
    return w.membership


class _expect:
    """`with _expect(Left):` the exception a hand-off ends with, and only that."""

    def __init__(self, kind: type[BaseException]) -> None:
        self.kind = kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> bool:
        if kind is None:
            raise AssertionError(f"expected {self.kind.__name__}")
        return issubclass(kind, self.kind)
