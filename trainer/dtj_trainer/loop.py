"""The worker's training loop: it reads like the algorithm, whatever the method.

build (same seed everywhere) -> for each step: sample, backward,
algorithm.after_backward, local step, algorithm.after_step, report
-> average the models once and evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import algorithms, data, models
from .config import TrainerConfig
from .metrics import Progress, Result
from .transport import Transport

Reporter = Callable[[Progress], None]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean().item())


def consensus_distance(x: torch.Tensor, transport: Transport) -> tuple[torch.Tensor, float]:
    """(x_bar, (1/n) sum_i ||x_i - x_bar||^2): two all-reduces, every worker calls it."""
    x_bar = transport.all_reduce_mean(x)
    dist = transport.all_reduce_mean(((x - x_bar) ** 2).sum().reshape(1))
    return x_bar, float(dist.item())


@dataclass
class Worker:
    """One worker's model, data and optimizer, built identically on every rank."""

    cfg: TrainerConfig
    transport: Transport
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: data.Sampler
    dataset: data.Dataset

    @classmethod
    def build(cls, cfg: TrainerConfig, transport: Transport) -> Worker:
        seed = cfg.training.seed
        ds = data.load(cfg.training.dataset, seed)
        shards = data.split(ds.y_train.numpy(), transport.size, cfg.training.data_split, seed)
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
        sampler = data.Sampler(
            ds.x_train[mine], ds.y_train[mine], seed=seed * 100_003 + transport.rank
        )
        return cls(cfg, transport, model, opt, sampler, ds)

    def train(self, report: Reporter) -> Result:
        cfg, t = self.cfg, self.transport
        algo = algorithms.make(cfg.algorithm, t)
        loss_fn = nn.CrossEntropyLoss()
        batch = cfg.batching.per_worker
        start = window_start = time.perf_counter()
        window_samples = 0
        for step in range(cfg.training.steps):
            x, y = self.sampler.next(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(self.model(x), y)
            loss.backward()
            algo.after_backward(self.model, batch=batch, step=step)
            self.optimizer.step()
            algo.after_step(self.model, step=step)
            window_samples += batch
            done = step + 1
            if done % cfg.training.eval_every == 0 or done == cfg.training.steps:
                now = time.perf_counter()
                report(
                    Progress(
                        rank=t.rank,
                        step=done,
                        loss=float(loss.item()),
                        samples_per_second=window_samples / max(now - window_start, 1e-9),
                        test_accuracy=accuracy(
                            self.model, self.dataset.x_test, self.dataset.y_test
                        ),
                        bytes_sent=t.counters.bytes_sent,
                        bytes_received=t.counters.bytes_received,
                        comm_wait_seconds=t.counters.wait_seconds,
                    )
                )
                window_start, window_samples = now, 0
        return self.finish(time.perf_counter() - start)

    def finish(self, seconds: float) -> Result:
        """Evaluate this worker's model and the average of all models."""
        ds = self.dataset
        own = accuracy(self.model, ds.x_test, ds.y_test)
        x = algorithms.flat_params(self.model)
        x_bar, dist = consensus_distance(x, self.transport)
        algorithms.set_flat_params(self.model, x_bar)
        avg = accuracy(self.model, ds.x_test, ds.y_test)
        algorithms.set_flat_params(self.model, x)
        return Result(self.cfg.training.steps, own, avg, dist, seconds)
