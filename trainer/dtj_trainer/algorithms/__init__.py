"""The training methods of ALGORITHMS.md, each written once against `Transport`.

Every method is a `round(local, step)` coroutine that reads like its
pseudo-code: it decides when the worker computes a gradient, when it applies
it, and what it sends and receives. `Local` holds the worker's own model,
optimizer and data; the transport moves tensors.
"""

from __future__ import annotations

from ..config import AlgorithmSpec
from ..transport import Transport
from .allreduce import AllReduce
from .base import Algorithm, Local, RoundStats, flat_params, set_flat_params, weighted_average
from .dasgd import DASGD
from .dpsgd import DPSGD
from .gosgd import GoSGD
from .teleportation import Teleportation

__all__ = [
    "DASGD",
    "DPSGD",
    "Algorithm",
    "AllReduce",
    "GoSGD",
    "Local",
    "RoundStats",
    "Teleportation",
    "flat_params",
    "make",
    "replicates",
    "set_flat_params",
    "weighted_average",
]


CLASSES: dict[str, type[AllReduce | DPSGD | GoSGD | DASGD | Teleportation]] = {
    "allreduce": AllReduce,
    "dpsgd": DPSGD,
    "gosgd": GoSGD,
    "dasgd": DASGD,
    "teleportation": Teleportation,
}


def replicates(spec: AlgorithmSpec) -> bool:
    """Whether the method's members hold identical replicas (a sync copies one's state)."""
    return bool(CLASSES[spec.name].replicates)


def make(
    spec: AlgorithmSpec, transport: Transport, *, seed: int, k: int | None = None
) -> Algorithm:
    """The algorithm object for `spec` (one per membership generation).

    `k` overrides teleportation's number of active slots (the k search uses it).
    """
    if spec.name == "allreduce":
        return AllReduce(transport, spec.round_seconds)
    if spec.name == "dpsgd":
        return DPSGD(transport, spec.topology)
    if spec.name == "gosgd":
        return GoSGD(transport, spec.gossip_probability, seed=seed)
    if spec.name == "dasgd":
        return DASGD(transport, spec, seed=seed)
    if spec.name == "teleportation":
        if k is None:
            if not isinstance(spec.active_nodes, int):
                raise ValueError("teleportation needs k: pass k or set algorithm.activeNodes")
            k = spec.active_nodes
        return Teleportation(transport, k=min(k, transport.size), topology=spec.topology, seed=seed)
    raise ValueError(f"unknown algorithm {spec.name!r}")
