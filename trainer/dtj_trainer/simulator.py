"""n virtual workers in one process, running the real algorithm code.

`SimWorld` gives each virtual worker a `SimTransport` endpoint; the workers'
training loops are coroutines on one asyncio event loop, so hundreds of them
fit on a laptop and every run is deterministic (collectives sum in rank
order). Synchronous methods rendezvous exactly as over torch.distributed.
Asynchronous methods (gosgd, dasgd) run in virtual time: each step costs the
worker's slowdown factor, and a worker only proceeds when no other worker is
behind it in virtual time, which reproduces who overtakes whom on
heterogeneous hardware without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import torch

from .config import ASYNC_ALGORITHMS, TrainerConfig
from .loop import Worker
from .metrics import CommCounters, Progress, Result
from .transport import Message


class SimWorld:
    """Shared state of one simulated job: channels, pending collectives, clocks."""

    def __init__(self, n: int, *, virtual_time: bool = False) -> None:
        self.n = n
        self.virtual_time = virtual_time
        self._loop = asyncio.get_running_loop()
        self._reduce: dict[int, tuple[dict[int, torch.Tensor], asyncio.Future[torch.Tensor]]] = {}
        self._channels: dict[tuple[int, int, int], list[asyncio.Future[torch.Tensor]]] = (
            collections.defaultdict(list)
        )
        self.mailboxes: list[collections.deque[Message]] = [collections.deque() for _ in range(n)]
        self.clock = [0.0] * n
        self.running = set(range(n))
        self.endpoints = [SimTransport(self, r) for r in range(n)]

    def future(self, src: int, dst: int, tag: int, seq: int) -> asyncio.Future[torch.Tensor]:
        chan = self._channels[(src, dst, tag)]
        while len(chan) <= seq:
            chan.append(self._loop.create_future())
        return chan[seq]

    async def reduce(self, seq: int, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        if seq not in self._reduce:
            self._reduce[seq] = ({}, self._loop.create_future())
        values, fut = self._reduce[seq]
        values[rank] = tensor
        if len(values) == self.n:
            total = values[0].clone()
            for r in range(1, self.n):
                total += values[r]
            fut.set_result(total / self.n)
            del self._reduce[seq]
        return (await fut).clone()


class SimTransport:
    """One virtual worker's view of the world; same interface as DistTransport."""

    def __init__(self, world: SimWorld, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.n
        self.virtual_time = world.virtual_time
        self.counters = CommCounters()
        self._reduce_seq = 0
        self._sent: collections.Counter[tuple[int, int]] = collections.Counter()
        self._recv: collections.Counter[tuple[int, int]] = collections.Counter()

    async def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        seq = self._reduce_seq
        self._reduce_seq += 1
        if self.size > 1:
            nbytes = int(2 * (self.size - 1) / self.size * tensor.numel() * tensor.element_size())
            self.counters.add(sent=nbytes, received=nbytes)
        return await self.world.reduce(seq, self.rank, tensor.detach().clone())

    def _send(self, peer: int, tag: int, tensor: torch.Tensor) -> None:
        seq = self._sent[(peer, tag)]
        self._sent[(peer, tag)] += 1
        self.world.future(self.rank, peer, tag, seq).set_result(tensor.detach().clone())
        self.counters.add(sent=tensor.numel() * tensor.element_size(), received=0)

    async def _receive(self, peer: int, tag: int) -> torch.Tensor:
        seq = self._recv[(peer, tag)]
        self._recv[(peer, tag)] += 1
        t = await self.world.future(peer, self.rank, tag, seq)
        self.counters.add(sent=0, received=t.numel() * t.element_size())
        return t

    async def exchange(self, tensor: torch.Tensor, peers: list[int]) -> dict[int, torch.Tensor]:
        for p in peers:
            self._send(p, 0, tensor)
        return {p: await self._receive(p, 0) for p in peers}

    async def transfer(
        self, send: tuple[int, torch.Tensor] | None, recv: tuple[int, torch.Tensor] | None
    ) -> torch.Tensor | None:
        if send is not None:
            self._send(send[0], 2, send[1])
        if recv is None:
            return None
        t = await self._receive(recv[0], 2)
        recv[1].copy_(t)
        return recv[1]

    async def open_inbox(self, numel: int) -> None:
        return None

    def post(self, tensor: torch.Tensor, peer: int) -> None:
        self.world.mailboxes[peer].append((self.rank, tensor.detach().clone()))
        self.counters.add(sent=tensor.numel() * tensor.element_size(), received=0)

    def inbox(self) -> list[Message]:
        box = self.world.mailboxes[self.rank]
        out = list(box)
        box.clear()
        for _, t in out:
            self.counters.add(sent=0, received=t.numel() * t.element_size())
        return out

    async def tick(self, cost: float) -> None:
        if not self.virtual_time:
            await asyncio.sleep(0)
            return
        w = self.world
        w.clock[self.rank] += cost
        while w.clock[self.rank] > min(w.clock[r] for r in w.running) + 1e-9:
            await asyncio.sleep(0)

    async def drain(self) -> list[Message]:
        self.world.running.discard(self.rank)
        await self.all_reduce_mean(torch.zeros(1))  # every push has been made
        return self.inbox()

    def abandon(self) -> None:
        return None

    def close(self) -> None:
        return None


EvalHook = Callable[[int, list[Worker]], None]


def simulate(
    cfg: TrainerConfig,
    *,
    slowdowns: dict[int, float] | None = None,
    report: Callable[[Progress], None] | None = None,
    on_round: EvalHook | None = None,
) -> tuple[list[Result], list[Worker]]:
    """Run cfg.replicas virtual workers to the end; results in rank order.

    `on_round(step, workers)` is called once all workers reported `step`
    (every cfg.training.evalEvery rounds), e.g. to evaluate the average model.
    """

    async def main() -> tuple[list[Result], list[Worker]]:
        world = SimWorld(cfg.replicas, virtual_time=cfg.algorithm.name in ASYNC_ALGORITHMS)
        workers = [
            Worker.build(cfg, t, slowdown=(slowdowns or {}).get(t.rank, 1.0))
            for t in world.endpoints
        ]
        total = [0]

        def count(new: int) -> int:  # the job-wide sample count (a store in real runs)
            total[0] += new
            return total[0]

        for w in workers:
            w.counter = count
        seen: collections.Counter[int] = collections.Counter()

        def hook(p: Progress) -> None:
            if report:
                report(p)
            seen[p.step] += 1
            if on_round and seen[p.step] == cfg.replicas:
                on_round(p.step, workers)

        results = await asyncio.gather(*(w.train(hook) for w in workers))
        return list(results), workers

    return asyncio.run(main())


def run_rounds(cfg: TrainerConfig, body: Callable[[list[Worker]], Any]) -> Any:
    """Build the virtual workers and run an arbitrary coroutine factory over them (tests)."""

    async def main() -> Any:
        world = SimWorld(cfg.replicas, virtual_time=cfg.algorithm.name in ASYNC_ALGORITHMS)
        workers = [Worker.build(cfg, t) for t in world.endpoints]
        return await body(workers)

    return asyncio.run(main())
