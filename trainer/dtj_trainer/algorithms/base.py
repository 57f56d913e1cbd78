"""What every algorithm shares: the worker's local state and the round contract."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..data import Sampler
from ..emulation import Emulation
from ..objective import LossFn, autocast, loss_of
from ..transport import Transport


def flat_params(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        vector_to_parameters(flat, model.parameters())


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


class Driver(Protocol):
    """Who computes a worker's gradients when the loop is the user's: `compute` hands
    the model to the user's code for one forward and backward (it resumes when the
    user calls the wrapped optimizer's `step()`) and returns the loss it reported;
    `round_over` lets the user's code go on after the method's round, and resumes
    when it asks for the next batch. Both suspend the loop's coroutine, so the
    user's code and the method take turns on one thread."""

    async def compute(self, local: Local) -> float: ...

    async def round_over(self) -> None: ...

    def reported(self) -> dict[str, float]:
        """The numbers the user's loop reported last (job.report)."""
        ...


@dataclass
class Local:
    """One worker's model, optimizer and data: the purely local half of a step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: Sampler
    batch: int
    lr: float
    loss_fn: LossFn
    # Benchmarks and tests only: modelled hardware, slept here before the worker
    # communicates (heterogeneous hardware; GPU-like steps where communication is small).
    emulation: Emulation = field(default_factory=Emulation)
    # Dynamic batching: n b_i / sum_j b_j, so equal-weight averages are sample-weighted.
    grad_scale: float = 1.0
    # The size of the batch last computed: `batch` but for a user's loop that loads
    # ahead (job.batches(num_workers=...)), whose batch may predate a re-plan.
    drawn: int = 0
    compute_seconds: float = 0.0  # this worker's compute time so far (never waiting)
    data_seconds: float = 0.0  # time spent reading and collating batches
    precision: str = "fp32"  # training.precision
    clip_norm: float | None = None  # optimizer.gradClipNorm
    # The user's own loop (dtj_trainer.init): it computes the gradients instead of
    # the built-in forward and backward below.
    driver: Driver | None = None
    # What else moves with the worker (a user's LR scheduler, grad scaler, own state):
    # objects with state_dict() and load_state_dict(), by name.
    extras: dict[str, Any] = field(default_factory=dict)

    async def grad(self) -> float:
        """Forward and backward on a fresh local mini-batch; returns the loss."""
        t0 = time.perf_counter()
        # From zero in both paths: a method may have left other gradients in .grad
        # (dasgd applies the peers' before this one), and a user's loop zeroes after
        # its step, so its backward would add to them.
        self.optimizer.zero_grad(set_to_none=True)
        self.drawn = self.batch  # a driver that loaded ahead says otherwise
        if self.driver is not None:
            value = await self.driver.compute(self)
        else:
            t_data = time.perf_counter()
            x, y = self.sampler.next(self.batch)
            self.data_seconds += time.perf_counter() - t_data
            with autocast(self.model, self.precision):
                loss = loss_of(self.model(x), y, self.loss_fn)
            loss.backward()
            value = float(loss.item())
        if self.grad_scale != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)
        real = time.perf_counter() - t0
        modelled = self.emulation.extra_seconds(real, self.drawn)
        if modelled > 0:
            time.sleep(modelled)
        self.compute_seconds += real + modelled
        return value

    async def round_over(self) -> None:
        """The loop is between rounds: a user's loop may go on (this one waits)."""
        if self.driver is not None:
            await self.driver.round_over()

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
        """Apply the gradient in .grad (clipped to clip_norm first, when set)."""
        if self.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()

    def params(self) -> torch.Tensor:
        return flat_params(self.model)

    def state_vector(self) -> torch.Tensor:
        """Parameters then buffers, flat: what a state sync and the final average
        average. Integer buffers (BatchNorm's num_batches_tracked) ride along as floats
        and are rounded back, so every member ends with the same whole model."""
        buffers = list(self.model.buffers())
        if not buffers:
            return self.params()
        flat = [b.detach().reshape(-1).to(torch.float32) for b in buffers]
        return torch.cat([self.params(), *flat])

    def set_state_vector(self, flat: torch.Tensor) -> None:
        n = sum(p.numel() for p in self.model.parameters())
        self.set_params(flat[:n])
        offset = n
        with torch.no_grad():
            for b in self.model.buffers():
                part = flat[offset : offset + b.numel()].view_as(b)
                b.copy_(part if b.is_floating_point() else part.round())
                offset += b.numel()

    def full_state(self, *, with_model: bool) -> dict[str, Any]:
        """What moves with a worker: the optimizer state, the extras' state and, with
        `with_model`, the model's parameters and buffers (a replica's whole state)."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if with_model:
            state["model"] = self.model.state_dict()
        return state | self.extras_state()

    def load_full_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "model" in state:
            self.model.load_state_dict(state["model"])
        self.load_extras(state)

    def extras_state(self) -> dict[str, Any]:
        if not self.extras:
            return {}
        return {"extras": {name: obj.state_dict() for name, obj in self.extras.items()}}

    def load_extras(self, state: dict[str, Any]) -> None:
        for name, value in state.get("extras", {}).items():
            if name in self.extras:
                self.extras[name].load_state_dict(value)

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
    """A method's round contract and the capabilities the loop relies on.

    `weights_batches`: the method weighs gradients by batch size itself (dynamic
    batching then needs no gradient scale). `replicates`: every member holds the
    same model, so a state sync copies one member's whole state (parameters,
    buffers, optimizer state) to all, as DDP keeps replicas identical.
    `state_weight()`: this model's weight in a state sync and in the consensus
    distance (GoSGD's sum-weight; teleportation's 1 for a slot holder, 0 idle).
    """

    weights_batches: bool
    replicates: bool

    def state_weight(self) -> float: ...

    async def setup(self, local: Local) -> None:
        """Once, on every worker together, before the first round."""
        ...

    async def round(self, local: Local, step: int) -> RoundStats: ...

    async def finish(self, local: Local) -> float:
        """After the last round: settle in-flight messages; return this model's weight
        in the final average (0 for a worker whose model is not part of the result)."""
        ...
