"""How workers move tensors: one interface, written against by every algorithm.

`Transport` is what an algorithm sees: its rank and the number of live
workers in the current membership generation, a mean all-reduce, and a
symmetric exchange with named peers. `DistTransport` implements it over
torch.distributed process groups built directly on a `PrefixStore("gen{g}")`,
so a new membership generation gets a fresh group without touching (or even
having) a default group: destroying and re-creating the default group is
fragile (pytorch#55967). The exchange is a schedule both ends know in advance
(each end sends to and receives from the same peer list), so the same code is
valid on NCCL, which cannot receive from "any source".
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .metrics import CommCounters


class Transport(Protocol):
    """The communication a worker needs; implementations own the wire."""

    rank: int
    size: int
    counters: CommCounters

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over all live workers (every worker must call it)."""
        ...

    def exchange(self, tensor: torch.Tensor, peers: list[int]) -> dict[int, torch.Tensor]:
        """Send `tensor` to every peer and receive theirs; peers must list each other."""
        ...

    def close(self) -> None: ...


def connect_store(host: str, port: int, *, timeout: float) -> dist.Store:
    """A client of the job's coordinator TCPStore (it lives outside the workers)."""
    return dist.TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout), use_libuv=True
    )


class DistTransport:
    """torch.distributed (gloo on CPU, nccl on GPU) for one membership generation."""

    def __init__(
        self,
        store: dist.Store,
        *,
        generation: int,
        rank: int,
        size: int,
        backend: str = "gloo",
        timeout: float = 60.0,
    ) -> None:
        self.rank, self.size, self.generation = rank, size, generation
        self.counters = CommCounters()
        self._device = torch.device("cuda" if backend == "nccl" else "cpu")
        prefixed = dist.PrefixStore(f"gen{generation}/", store)
        td = timedelta(seconds=timeout)
        if backend == "nccl":  # pragma: no cover - needs a GPU
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            self._pg: Any = dist.ProcessGroupNCCL(prefixed, rank, size, opts)
        else:
            self._pg = dist.ProcessGroupGloo(prefixed, rank, size, td)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(self._device).clone()
        if self.size > 1:
            with self.counters.waiting():
                self._pg.allreduce([out]).wait()
            # A ring all-reduce moves ~2(n-1)/n of the tensor each way per worker.
            nbytes = int(2 * (self.size - 1) / self.size * out.numel() * out.element_size())
            self.counters.add(sent=nbytes, received=nbytes)
        return out.div_(self.size).to(tensor.device)

    def exchange(self, tensor: torch.Tensor, peers: list[int]) -> dict[int, torch.Tensor]:
        if not peers:
            return {}
        payload = tensor.detach().to(self._device).contiguous()
        inbox = {p: torch.empty_like(payload) for p in peers}
        works = []
        with self.counters.waiting():
            for p in peers:
                works.append(self._pg.send([payload], p, 0))
                works.append(self._pg.recv([inbox[p]], p, 0))
            for w in works:
                w.wait()
        nbytes = payload.numel() * payload.element_size() * len(peers)
        self.counters.add(sent=nbytes, received=nbytes)
        return {p: t.to(tensor.device) for p, t in inbox.items()}

    def close(self) -> None:
        self._pg = None
