"""What every algorithm shares: the worker's local state and the round contract."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..data import Sampler


def flat_params(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        vector_to_parameters(flat, model.parameters())


@dataclass
class Local:
    """One worker's model, optimizer and data: the purely local half of a step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: Sampler
    batch: int
    lr: float
    loss_fn: nn.Module
    # Benchmarks and tests only: modelled compute time per sample, and a factor on
    # all of this worker's compute, spent here before the worker communicates
    # (heterogeneous hardware; GPU-like steps where communication is small).
    sample_seconds: float = 0.0
    slowdown: float = 1.0
    # Dynamic batching: n b_i / sum_j b_j, so equal-weight averages are sample-weighted.
    grad_scale: float = 1.0
    compute_seconds: float = 0.0  # this worker's compute time so far (never waiting)

    def grad(self) -> float:
        """Forward and backward on a fresh local mini-batch; returns the loss."""
        t0 = time.perf_counter()
        x, y = self.sampler.next(self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.grad_scale != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)
        real = time.perf_counter() - t0
        modelled = (self.slowdown - 1) * real + self.sample_seconds * self.slowdown * self.batch
        if modelled > 0:
            time.sleep(modelled)
        self.compute_seconds += real + modelled
        return float(loss.item())

    def flat_grad(self) -> torch.Tensor:
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.model.parameters()
            ]
        )

    def set_flat_grad(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.model.parameters():
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def step(self) -> None:
        self.optimizer.step()

    def params(self) -> torch.Tensor:
        return flat_params(self.model)

    def set_params(self, flat: torch.Tensor) -> None:
        set_flat_params(self.model, flat)


@dataclass(frozen=True)
class RoundStats:
    """What one round did on this worker."""

    loss: float | None  # None when this worker computed nothing (inactive slot)
    samples: int
    staleness: float | None = None
    stale: tuple[int, ...] = ()  # staleness of each update received this round (dasgd)
    dropped: int = 0  # of those, dropped as too stale


class Algorithm(Protocol):
    async def setup(self, local: Local) -> None:
        """Once, on every worker together, before the first round."""
        ...

    async def round(self, local: Local, step: int) -> RoundStats: ...

    async def finish(self, local: Local) -> float:
        """After the last round: settle in-flight messages; return this model's weight
        in the final average (0 for a worker whose model is not part of the result)."""
        ...
