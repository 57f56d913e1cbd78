"""The worker's training loop: it reads like a story, whatever the method.

    build (same seed everywhere) -> algorithm.setup -> for each step:
    algorithm.round, report -> algorithm.finish -> weighted average, evaluate.

It is a coroutine so that the same code runs as a real process
(DistTransport) and as one of many virtual workers in the simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import algorithms, checkpoint, data, models
from .config import ASYNC_ALGORITHMS, TrainerConfig
from .metrics import Progress, Result
from .transport import Transport

Reporter = Callable[[Progress], None]
VALIDATION_FRACTION = 0.1


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean().item())


def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y).item())


async def weighted_average(
    x: torch.Tensor, weight: float, transport: Transport
) -> tuple[torch.Tensor, float]:
    """(x_bar, consensus distance) over the workers whose weight is > 0.

    x_bar = sum_i w_i x_i / sum_i w_i; distance = sum_i w_i ||x_i - x_bar||^2 / sum_i w_i.
    Every worker must call it.
    """
    packed = await transport.all_reduce_mean(torch.cat([x * weight, torch.tensor([weight])]))
    x_bar = packed[:-1] / packed[-1]
    spread = await transport.all_reduce_mean(
        torch.tensor([weight * float(((x - x_bar) ** 2).sum()), weight])
    )
    return x_bar, float(spread[0] / spread[1])


@dataclass
class Worker:
    """One worker's model, data and optimizer, built identically on every rank."""

    cfg: TrainerConfig
    transport: Transport
    local: algorithms.Local
    dataset: data.Dataset
    x_val: torch.Tensor
    y_val: torch.Tensor
    x0: torch.Tensor
    slowdown: float = 1.0
    algo: algorithms.Algorithm | None = None
    stop_after: int | None = None  # end the run early after this round (benchmarks)
    current_step: int = 0

    @classmethod
    def build(cls, cfg: TrainerConfig, transport: Transport, *, slowdown: float = 1.0) -> Worker:
        seed = cfg.training.seed
        ds = data.load(cfg.training.dataset, seed)
        n_val = int(VALIDATION_FRACTION * len(ds.y_train))
        x_train, y_train = ds.x_train[n_val:], ds.y_train[n_val:]
        shards = data.split(y_train.numpy(), transport.size, cfg.training.data_split, seed)
        mine = torch.from_numpy(shards[transport.rank])
        torch.manual_seed(seed)  # identical x0 on every worker
        model = models.build(
            cfg.training.model, num_features=ds.num_features, num_classes=ds.num_classes
        )
        opt = torch.optim.SGD(
            model.parameters(),
            lr=cfg.optimizer.lr,
            momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay,
        )
        sampler = data.Sampler(x_train[mine], y_train[mine], seed=seed * 100_003 + transport.rank)
        local = algorithms.Local(
            model, opt, sampler, cfg.batching.per_worker, cfg.optimizer.lr, nn.CrossEntropyLoss()
        )
        return cls(
            cfg,
            transport,
            local,
            ds,
            ds.x_train[:n_val],
            ds.y_train[:n_val],
            algorithms.flat_params(model),
            slowdown,
        )

    def reset(self) -> None:
        """Back to x0 with a fresh optimizer state (the k search restarts from x0)."""
        self.local.set_params(self.x0)
        self.local.optimizer.state.clear()

    async def run(
        self, steps: int, *, k: int | None = None, report: Reporter | None = None
    ) -> tuple[float, float]:
        """Train for `steps` rounds; returns (this model's final weight, samples/s)."""
        cfg, t = self.cfg, self.transport
        algo = algorithms.make(cfg.algorithm, t, seed=cfg.training.seed, k=k)
        self.algo = algo
        await algo.setup(self.local)
        window_start, window_samples = time.perf_counter(), 0
        run_start, run_samples = window_start, 0
        losses: list[float] = []
        staleness: list[float] = []
        for step in range(steps):
            self.current_step = step
            t0 = time.perf_counter()
            stats = await algo.round(self.local, step)
            spent = time.perf_counter() - t0
            if self.slowdown > 1 and not t.virtual_time:
                # Heterogeneity emulation: this worker is slower hardware.
                await asyncio.sleep((self.slowdown - 1) * spent)
            await t.tick(self.slowdown)
            window_samples += stats.samples
            run_samples += stats.samples
            if stats.loss is not None:
                losses.append(stats.loss)
            if stats.staleness is not None:
                staleness.append(stats.staleness)
            done = step + 1
            ckpt = cfg.training.checkpoint
            if ckpt and report and (done % ckpt.every_steps == 0 or done == steps):
                checkpoint.save(ckpt.path, t.rank, step=done, params=self.local.params())
            if report and (done % cfg.training.eval_every == 0 or done == steps):
                distance = None
                if cfg.algorithm.name not in ASYNC_ALGORITHMS:
                    # Synchronous methods reach this step together: two small
                    # all-reduces give the live consensus distance.
                    weight = float(getattr(algo, "holding", True))
                    _, distance = await weighted_average(self.local.params(), weight, t)
                now = time.perf_counter()
                report(
                    Progress(
                        rank=t.rank,
                        step=done,
                        loss=sum(losses) / len(losses) if losses else float("nan"),
                        samples_per_second=window_samples / max(now - window_start, 1e-9),
                        test_accuracy=accuracy(
                            self.local.model, self.dataset.x_test, self.dataset.y_test
                        ),
                        bytes_sent=t.counters.bytes_sent,
                        bytes_received=t.counters.bytes_received,
                        comm_wait_seconds=t.counters.wait_seconds,
                        staleness=sum(staleness) / len(staleness) if staleness else None,
                        consensus_distance=distance,
                    )
                )
                window_start, window_samples, losses, staleness = now, 0, [], []
            if report and self.stop_after is not None and done >= self.stop_after:
                break
        rate = run_samples / max(time.perf_counter() - run_start, 1e-9)
        weight = await algo.finish(self.local)
        return weight, rate

    async def search_k(self, budget: int) -> int:
        """Teleportation's k, found within `budget` total rounds (ALGORITHMS.md, Algorithm 2).

        A doubling search over k in {1, 2, 4, ..., n}: each candidate trains
        from x0 for an equal share of the budget and is scored by validation
        loss of its averaged slot models; the best k wins. The paper's exact
        schedule is unconfirmed; this keeps the total cost <= T.
        """
        n = self.transport.size
        candidates = [2**j for j in range(n.bit_length()) if 2**j <= n]
        share = max(1, budget // len(candidates))
        scores = {}
        for k in candidates:
            self.reset()
            weight, _ = await self.run(share, k=k)
            x_bar, _ = await weighted_average(self.local.params(), weight, self.transport)
            algorithms.set_flat_params(self.local.model, x_bar)
            scores[k] = loss_on(self.local.model, self.x_val, self.y_val)
        self.reset()
        return min(scores, key=lambda k: scores[k])

    async def train(self, report: Reporter | None = None) -> Result:
        cfg = self.cfg
        await self.transport.all_reduce_mean(torch.zeros(1))  # start together
        start = time.perf_counter()
        k = None
        if cfg.algorithm.name == "teleportation" and cfg.algorithm.active_nodes == "auto":
            k = await self.search_k(cfg.training.steps)
        weight, rate = await self.run(cfg.training.steps, k=k, report=report)
        return await self.finish(weight, time.perf_counter() - start, k, rate)

    async def finish(
        self, weight: float, seconds: float, k: int | None = None, rate: float = 0.0
    ) -> Result:
        """Evaluate this worker's model and the weighted average of all models."""
        ds = self.dataset
        own = accuracy(self.local.model, ds.x_test, ds.y_test)
        x = self.local.params()
        x_bar, dist = await weighted_average(x, weight, self.transport)
        self.local.set_params(x_bar)
        avg = accuracy(self.local.model, ds.x_test, ds.y_test)
        self.local.set_params(x)
        return Result(self.cfg.training.steps, own, avg, dist, seconds, k, rate)
