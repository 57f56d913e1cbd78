"""n virtual workers in one process, running the real algorithm code.

`SimWorld` gives each virtual worker a `SimTransport` endpoint; the workers'
training loops are coroutines on one asyncio event loop, so hundreds of them
fit on a laptop and every run is deterministic (collectives sum in rank
order). Synchronous methods rendezvous exactly as over torch.distributed.
Asynchronous methods (gosgd, dasgd) run in virtual time, as a discrete-event
simulation: a round of worker i starts at its clock c_i, reads the messages
delivered by then, computes (cost: its slowdown factor, in rounds of a speed-1
worker), and what it sends is delivered at c_i + cost + latency (compute is
charged before the send, and a message is in flight for `latency`). A worker
starts a round only when no other worker's clock is behind its own, so rounds
run in order of their start time, which reproduces who overtakes whom on
heterogeneous hardware, and how stale what arrives is, without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from . import ledger
from .config import ASYNC_ALGORITHMS, TrainerConfig
from .emulation import Emulation
from .loop import Worker
from .members import Fixed
from .metrics import CommCounters, Progress, Result
from .transport import Message

# Calibrated against real gloo processes (tests/trainer/test_simulator_fidelity.py):
# with these, dasgd's measured staleness (mean, max, per worker) matches 4 real
# workers with one 3x slower to within ~10%.
LATENCY = 0.05  # rounds of a speed-1 worker a message is in flight
JITTER = 0.2  # spread of each round's cost


class SimWorld:
    """Shared state of one simulated job: channels, pending collectives, clocks."""

    def __init__(
        self,
        n: int,
        *,
        virtual_time: bool = False,
        costs: list[float] | None = None,
        latency: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.n = n
        self.virtual_time = virtual_time
        self.costs = costs or [1.0] * n  # virtual time a round of each worker takes
        self.latency = latency  # virtual time a message is in flight
        # Each round's cost is cost x (1 + jitter x U(-1, 1)): real workers of equal speed
        # drift apart instead of running in lockstep.
        self.jitter = jitter
        self._rngs = [random.Random(seed * 1_000_003 + r) for r in range(n)]
        self.round_cost = [self._draw(r) for r in range(n)]  # of each worker's current round
        self._loop = asyncio.get_running_loop()
        self._reduce: dict[int, tuple[dict[int, torch.Tensor], asyncio.Future[torch.Tensor]]] = {}
        self._channels: dict[tuple[int, int, int], list[asyncio.Future[torch.Tensor]]] = (
            collections.defaultdict(list)
        )
        # (delivery time, sender, payload) per receiver
        self.mailboxes: list[list[tuple[float, int, torch.Tensor]]] = [[] for _ in range(n)]
        self.clock = [0.0] * n
        self.running = set(range(n))
        self.endpoints = [SimTransport(self, r) for r in range(n)]

    def _draw(self, rank: int) -> float:
        noise = 1.0 + self.jitter * (2 * self._rngs[rank].random() - 1) if self.jitter else 1.0
        return self.costs[rank] * noise

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

    async def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.rank == src:
            for p in range(self.size):
                if p != src:
                    self._send(p, 3, tensor)
            return tensor.detach().clone()
        return (await self._receive(src, 3)).clone()

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
        w = self.world
        # Sent once this round's compute is done; arrives `latency` later.
        at = w.clock[self.rank] + w.round_cost[self.rank] + w.latency if self.virtual_time else 0.0
        w.mailboxes[peer].append((at, self.rank, tensor.detach().clone()))
        self.counters.add(sent=tensor.numel() * tensor.element_size(), received=0)

    def inbox(self, *, everything: bool = False) -> list[Message]:
        """What has been delivered by this worker's clock (in arrival order)."""
        w = self.world
        now = w.clock[self.rank] + 1e-9

        def due(m: tuple[float, int, torch.Tensor]) -> bool:
            return everything or not self.virtual_time or m[0] <= now

        box = w.mailboxes[self.rank]
        ready = sorted((m for m in box if due(m)), key=lambda m: (m[0], m[1]))
        w.mailboxes[self.rank] = [m for m in box if not due(m)]
        out = [(sender, t) for _, sender, t in ready]
        for _, t in out:
            self.counters.add(sent=0, received=t.numel() * t.element_size())
        return out

    async def tick(self) -> None:
        """End of a round: advance this worker's clock by the round's cost (its slowdown,
        jittered), then wait until no other worker is behind."""
        if not self.virtual_time:
            await asyncio.sleep(0)
            return
        w = self.world
        w.clock[self.rank] += w.round_cost[self.rank]
        w.round_cost[self.rank] = w._draw(self.rank)
        while w.clock[self.rank] > min(w.clock[r] for r in w.running) + 1e-9:
            await asyncio.sleep(0)

    async def drain(self) -> list[Message]:
        self.world.running.discard(self.rank)
        await self.all_reduce_mean(torch.zeros(1))  # every push has been made
        return self.inbox(everything=True)

    def abandon(self) -> None:
        return None

    def close(self) -> None:
        return None


EvalHook = Callable[[int, list[Worker]], "int | None"]


def simulate(
    cfg: TrainerConfig,
    *,
    slowdowns: dict[int, float] | None = None,
    report: Callable[[Progress], None] | None = None,
    on_round: EvalHook | None = None,
    latency: float = LATENCY,
    jitter: float = JITTER,
    sample_seconds: float = 0.0,
) -> tuple[list[Result], list[Worker]]:
    """Run cfg.replicas virtual workers to the end; results in rank order.

    `on_round(step, workers)` is called once all workers reported `step`
    (every cfg.training.evalEvery rounds), e.g. to evaluate the average model; it may
    return a step at which every worker ends its run (a benchmark that has seen enough).
    Asynchronous methods: worker r's round takes slowdowns[r] (default 1) of
    virtual time, x (1 + jitter x U(-1, 1)) each round, and a message `latency`
    more to arrive. Synchronous methods run in wall time: `sample_seconds` of modelled
    compute per sample (a sleep) makes a step's time grow with its batch, as on real
    hardware, where a tiny model's step is all fixed overhead.
    """

    async def main() -> tuple[list[Result], list[Worker]]:
        costs = [(slowdowns or {}).get(r, 1.0) for r in range(cfg.replicas)]
        world = SimWorld(
            cfg.replicas,
            virtual_time=cfg.algorithm.name in ASYNC_ALGORITHMS,
            costs=costs,
            latency=latency,
            jitter=jitter,
            seed=cfg.training.seed,
        )
        total = [0]

        def count(new: int) -> int:  # the job-wide sample count (a store in real runs)
            total[0] += new
            return total[0]

        members = fixed_world(cfg.replicas, count)
        workers = [
            Worker.build(
                cfg,
                t,
                membership=members[t.rank],
                emulation=Emulation(
                    sample_seconds=sample_seconds, slowdown=(slowdowns or {}).get(t.rank, 1.0)
                ),
            )
            for t in world.endpoints
        ]
        seen: collections.Counter[int] = collections.Counter()

        stop: list[int] = []

        def hook(p: Progress) -> bool:
            if report:
                report(p)
            seen[p.step] += 1
            at = on_round(p.step, workers) if on_round and seen[p.step] == cfg.replicas else None
            if at is not None:
                stop.append(at)
            return bool(stop) and p.step >= stop[0]

        results = await asyncio.gather(*(w.train(hook) for w in workers))
        return list(results), workers

    return asyncio.run(main())


def run_rounds(cfg: TrainerConfig, body: Callable[[list[Worker]], Any]) -> Any:
    """Build the virtual workers and run an arbitrary coroutine factory over them (tests)."""

    async def main() -> Any:
        world = SimWorld(cfg.replicas, virtual_time=cfg.algorithm.name in ASYNC_ALGORITHMS)
        members = fixed_world(cfg.replicas)
        workers = [Worker.build(cfg, t, membership=members[t.rank]) for t in world.endpoints]
        return await body(workers)

    return asyncio.run(main())


def fixed_world(n: int, counter: Callable[[int], int] | None = None) -> list[Fixed]:
    """The memberships of `n` virtual workers of one job: one data ledger (its service
    stepped inline) and, for asynchronous methods, one sample count."""
    ids = [f"{r}.sim" for r in range(n)]
    service = ledger.Service(dist.HashStore(), members=lambda: ids, log=lambda _m: None)
    return [Fixed(counter=counter, ledger=service, member=m) for m in ids]
