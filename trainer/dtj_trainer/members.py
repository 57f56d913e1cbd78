"""Who a worker trains with, as its loop sees it: the `Membership` protocol.

The loop (loop.Worker) asks its membership a few questions and never looks
at how it is answered: how to start, what to do between rounds (a hand-off,
a new generation), what to do when a collective fails, where the job's
sample count lives. Two implementations:

  Fixed    (here) a static world: every worker from the first round to the
           last (the simulator, the benchmarks, tests). A failure is fatal.
  Elastic  (elastic.py) generations from the job's coordinator: workers leave,
           crash, freeze and join; a failure leads to a new generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

import torch
import torch.distributed as dist

from .ledger import Plan, Reader, Service

if TYPE_CHECKING:
    from .algorithms import Algorithm
    from .loop import Worker


class Membership(Protocol):
    def say(self, message: str) -> None:
        """Tell the user (the worker's log)."""
        ...

    def shard_parts(self, replicas: int, world: int, slot: int) -> int:
        """Into how many shards the data set is cut (this worker takes shard `slot`)."""
        ...

    def reader(self, plan: Plan) -> Reader:
        """This worker's line to the job's data ledger (dataSplit ledger)."""
        ...

    async def begin(self, w: Worker) -> None:
        """Meet the others before the first round; sets `w.started`."""
        ...

    async def between_rounds(self, w: Worker) -> Algorithm | None:
        """Before each round: the method for a new generation, if there is one (or
        the worker leaves: `elastic.Left`)."""
        ...

    async def recover(self, w: Worker, error: Exception, doing: str) -> Algorithm:
        """A collective failed while `doing`: the method to go on with (or raise)."""
        ...

    def count_samples(self, w: Worker, new: int) -> int:
        """Asynchronous methods: add `new` samples to the job's count; returns it."""
        ...

    def speeds(self, w: Worker, own: float) -> list[float] | None:
        """Asynchronous methods with dynamic batching: the members' measured speeds."""
        ...

    def search_over(self, started: float) -> None:
        """Teleportation's k search ended: a time budget counts from `started`."""
        ...

    def ended(self, step: int) -> None:
        """The job's training is over at `step` (a late joiner has nothing to do)."""
        ...

    def roster(self, size: int) -> tuple[int | None, int]:
        """(generation number, members) for progress reports."""
        ...


@dataclass
class Fixed:
    """A static world of `transport.size` workers; any failure ends the run."""

    # Asynchronous methods: the job-wide sample count shared by the simulator's
    # virtual workers (a real job keeps it in the coordinator's store).
    counter: Callable[[int], int] | None = None
    # The data ledger the simulator's virtual workers share (its service in-process).
    ledger: Service | None = None
    member: str = "0.fixed"

    def say(self, message: str) -> None:
        print(message, flush=True)

    def shard_parts(self, replicas: int, world: int, slot: int) -> int:
        return world

    def reader(self, plan: Plan) -> Reader:
        if self.ledger is None:
            self.ledger = Service(dist.HashStore(), log=self.say)
        service = self.ledger
        return Reader(plan, lambda: service.store, lambda: self.member, pump=service.step)

    async def begin(self, w: Worker) -> None:
        await w.transport.all_reduce_mean(torch.zeros(1))  # start together
        w.started = time.time()

    async def between_rounds(self, w: Worker) -> Algorithm | None:
        return None

    async def recover(self, w: Worker, error: Exception, doing: str) -> NoReturn:
        raise error

    def count_samples(self, w: Worker, new: int) -> int:
        if self.counter is not None:
            return self.counter(new)
        w.pace.consumed += new
        return w.pace.consumed

    def speeds(self, w: Worker, own: float) -> list[float] | None:
        return None

    def search_over(self, started: float) -> None:
        return None

    def ended(self, step: int) -> None:
        return None

    def roster(self, size: int) -> tuple[int | None, int]:
        return None, size
