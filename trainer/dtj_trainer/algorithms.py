"""The training methods of ALGORITHMS.md, each written once against `Transport`.

An algorithm hooks into the local SGD loop at two points: after the backward
pass (where all-reduce averages gradients) and after the local optimizer step
(where gossip mixes parameters). The loop itself stays the same for all.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from . import topology
from .config import AlgorithmSpec
from .transport import Transport


def flat_params(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach()


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        vector_to_parameters(flat, model.parameters())


class Algorithm(Protocol):
    def after_backward(self, model: nn.Module, *, batch: int, step: int) -> None: ...

    def after_step(self, model: nn.Module, *, step: int) -> None: ...


class AllReduce:
    """DDP-equivalent baseline: every step all workers apply the same mean gradient.

    The mean is weighted by local batch sizes, sum_i b_i g_i / sum_i b_i, so
    unequal batches (dynamic batching) still give the full-batch gradient; one
    collective carries both numerator and denominator.
    """

    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def after_backward(self, model: nn.Module, *, batch: int, step: int) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        grads = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        packed = torch.cat([grads * batch, torch.tensor([float(batch)])])
        mean = self.t.all_reduce_mean(packed)
        avg = mean[:-1] / mean[-1]
        offset = 0
        for p in params:
            assert p.grad is not None
            n = p.grad.numel()
            p.grad.copy_(avg[offset : offset + n].view_as(p.grad))
            offset += n

    def after_step(self, model: nn.Module, *, step: int) -> None:
        return None


class DPSGD:
    """Synchronous decentralized SGD: local step, then x_i <- sum_j W_ij x_j.

    Only neighbours talk, so bytes per step per worker are model size x degree,
    independent of n.
    """

    def __init__(self, transport: Transport, spec: AlgorithmSpec) -> None:
        self.t = transport
        self.topology = spec.topology

    def after_backward(self, model: nn.Module, *, batch: int, step: int) -> None:
        return None

    def after_step(self, model: nn.Module, *, step: int) -> None:
        weights = topology.mixing_weights(self.topology, self.t.size, self.t.rank, step)
        x = flat_params(model)
        peers = [p for p in weights if p != self.t.rank]
        received = self.t.exchange(x, peers)
        mixed = x * weights[self.t.rank]
        for p, xp in received.items():
            mixed += weights[p] * xp
        set_flat_params(model, mixed)


def make(spec: AlgorithmSpec, transport: Transport) -> Algorithm:
    """The algorithm object for `spec` (one per membership generation)."""
    if spec.name == "allreduce":
        return AllReduce(transport)
    if spec.name == "dpsgd":
        return DPSGD(transport, spec)
    raise NotImplementedError(
        f"algorithm {spec.name!r} is not implemented yet; use allreduce or dpsgd"
    )
