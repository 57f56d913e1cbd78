"""How workers move tensors: one interface, written against by every algorithm.

`Transport` is what an algorithm sees: its rank and the number of workers in
the current membership generation, a mean all-reduce, scheduled
point-to-point transfers both ends know in advance (`exchange`, `transfer`),
and fire-and-forget pushes with an inbox for the asynchronous methods
(`post`, `inbox`). Methods that may wait are coroutines, so the in-process
simulator (dtj_trainer.simulator) can run hundreds of virtual workers on one
event loop with the very same algorithm code.

`DistTransport` implements it over torch.distributed process groups built
directly on a `PrefixStore("gen{g}/...")`: a new membership generation gets
fresh groups without touching (or even having) a default group, because
destroying and re-creating the default group is fragile (pytorch#55967).
Scheduled transfers are valid on NCCL, which cannot receive from "any source";
the asynchronous inbox uses gloo's receive-from-any-source on a group of its
own (on NCCL it would be announced over the store first: not built yet).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .metrics import CommCounters

Message = tuple[int, torch.Tensor]
ABANDON_TAG = 999  # never sent: only used to close connections (DistTransport.abandon)


class Transport(Protocol):
    """The communication a worker needs; implementations own the wire."""

    rank: int
    size: int
    counters: CommCounters
    virtual_time: bool  # True in the simulator's asynchronous mode

    async def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over all workers (every worker must call it)."""
        ...

    async def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`src`'s `tensor` on every worker, bit for bit (any dtype; same shape everywhere)."""
        ...

    async def exchange(self, tensor: torch.Tensor, peers: list[int]) -> dict[int, torch.Tensor]:
        """Send `tensor` to every peer and receive theirs; peers must list each other."""
        ...

    async def transfer(
        self, send: tuple[int, torch.Tensor] | None, recv: tuple[int, torch.Tensor] | None
    ) -> torch.Tensor | None:
        """One scheduled send and/or receive (into the given buffer); returns what arrived."""
        ...

    def post(self, tensor: torch.Tensor, peer: int) -> None:
        """Push `tensor` to `peer` without waiting (asynchronous methods)."""
        ...

    async def open_inbox(self, numel: int) -> None:
        """Prepare to receive pushes of `numel` floats (every worker calls it, together)."""
        ...

    def inbox(self) -> list[Message]:
        """Everything pushed to this worker since the last call, as (sender, tensor)."""
        ...

    async def tick(self) -> None:
        """End of a round: a point where other workers may run (the simulator advances
        this worker's virtual clock by the round's cost here)."""
        ...

    async def drain(self) -> list[Message]:
        """End of run: wait until every push sent by anyone has arrived; return the rest."""
        ...

    def abandon(self) -> None:
        """Stop being part of this generation; peers blocked on us fail fast."""
        ...

    def close(self) -> None: ...


def connect_store(host: str, port: int, *, timeout: float) -> dist.Store:
    """A client of the job's coordinator TCPStore (it lives outside the workers)."""
    return dist.TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout), use_libuv=True
    )


def _group(
    store: dist.Store,
    prefix: str,
    rank: int,
    size: int,
    backend: str,
    timeout: float,
    host: str | None = None,
) -> Any:
    """A process group on `store` under `prefix`; gloo listens on `host` (the pod IP)
    when given, else on the address its hostname resolves to. `timeout` bounds
    forming the group and each operation (gloo fixes it at construction)."""
    prefixed = dist.PrefixStore(prefix, store)
    td = timedelta(seconds=timeout)
    if backend == "nccl":  # pragma: no cover - needs a GPU
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td
        return dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    if host is None:
        return dist.ProcessGroupGloo(prefixed, rank, size, td)
    gloo_opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    gloo_opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    gloo_opts._timeout = td
    return dist.ProcessGroupGloo(prefixed, rank, size, gloo_opts)


# Memory of the asynchronous path is bounded by count and by bytes: pushes kept in
# flight before the oldest is waited for, receive buffers posted, and received
# messages queued for the training loop, each at most BUFFER_BYTES of payload (so a
# large model keeps a few, never fewer than 2; a small one up to the count).
MAX_IN_FLIGHT = 64
MAX_POSTED = 16
MAX_QUEUED = 256
BUFFER_BYTES = 256 * 2**20


def slots(numel: int, most: int) -> int:
    """How many payloads of `numel` float32 values fit the byte budget (2..most)."""
    return max(2, min(most, BUFFER_BYTES // max(1, 4 * (numel + 2))))


class _Mailbox:
    """A background receiver for pushes, with a ring of posted receive buffers.

    Messages are flat tensors of a fixed length; the last two elements are the
    sender's rank (gloo's Work.source_rank is deprecated) and a kind flag
    (0 = payload, 1 = stop). The thread keeps `depth` receive-from-any-
    source buffers posted, so gloo's own threads accept pushes even while
    this Python thread waits for the GIL; it re-posts after every payload and
    not after a stop, so it ends once `depth` stops have arrived (see `drain`).
    gloo completes a receive only inside `wait()`, so polling cannot replace
    the thread. The queue for the training loop is bounded (`limit`): when it
    is full the thread stops re-posting until the loop takes, so senders'
    pushes stay in flight and their own bound holds them back (back-pressure),
    except while draining.
    """

    def __init__(self, pg: Any, numel: int) -> None:
        self._pg, self.numel = pg, numel
        self.depth = slots(numel, MAX_POSTED)
        self.limit = slots(numel, MAX_QUEUED)
        self.limit_in_flight = slots(numel, MAX_IN_FLIGHT)
        self.draining = False
        self._queue: collections.deque[Message] = collections.deque()
        self._room = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dtj-mailbox", daemon=True)
        self._thread.start()

    def _post(self) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(self.numel + 2)
        return buf, self._pg.recv_anysource([buf], 1)

    def _run(self) -> None:
        try:
            posted = collections.deque(self._post() for _ in range(self.depth))
            while posted:
                buf, work = posted.popleft()
                work.wait()
                if buf[-1].item() == 1.0:
                    continue
                with self._room:
                    self._queue.append((int(buf[-2].item()), buf[:-2]))
                    while len(self._queue) >= self.limit and not self.draining:
                        self._room.wait(0.1)
                posted.append(self._post())
        except RuntimeError:  # the generation was abandoned: its pushes are void
            return

    def take(self) -> list[Message]:
        with self._room:
            out = list(self._queue)
            self._queue.clear()
            self._room.notify()
        return out

    def queued(self) -> int:
        return len(self._queue)

    def drain_mode(self) -> None:
        """From now on the queue takes everything: drain must not wait on itself."""
        with self._room:
            self.draining = True
            self._room.notify()

    def join(self) -> None:
        self._thread.join()


class Unconnected:
    """The transport of a worker that has not joined a generation yet."""

    rank, size, generation = 0, 1, -1
    virtual_time = False

    def __init__(self) -> None:
        self.counters = CommCounters()

    def abandon(self) -> None:
        return None

    def close(self) -> None:
        return None


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
        host: str | None = None,
    ) -> None:
        self.rank, self.size, self.generation = rank, size, generation
        self._host = host
        self.virtual_time = False
        self.counters = CommCounters()
        self._device = torch.device("cuda" if backend == "nccl" else "cpu")
        self._store = store
        self._pg = _group(store, f"gen{generation}/", rank, size, backend, timeout, host)
        self._msg_pg: Any = None
        self._mailbox: _Mailbox | None = None
        self._sends: collections.deque[Any] = collections.deque()  # the latest pushes
        self._timeout = timedelta(seconds=timeout)
        self._abandoned = False

    async def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(self._device).clone()
        if self.size > 1:
            with self.counters.waiting():
                self._pg.allreduce([out]).wait()
            # A ring all-reduce moves ~2(n-1)/n of the tensor each way per worker.
            nbytes = int(2 * (self.size - 1) / self.size * out.numel() * out.element_size())
            self.counters.add(sent=nbytes, received=nbytes)
        return out.div_(self.size).to(tensor.device)

    async def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        out = tensor.detach().to(self._device).contiguous().clone()
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            with self.counters.waiting():
                self._pg.broadcast([out], opts).wait()
            nbytes = out.numel() * out.element_size()
            self.counters.add(sent=nbytes if self.rank == src else 0, received=nbytes)
        return out.to(tensor.device)

    async def exchange(self, tensor: torch.Tensor, peers: list[int]) -> dict[int, torch.Tensor]:
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

    async def transfer(
        self, send: tuple[int, torch.Tensor] | None, recv: tuple[int, torch.Tensor] | None
    ) -> torch.Tensor | None:
        works = []
        with self.counters.waiting():
            if send is not None:
                peer, t = send
                payload = t.detach().to(self._device).contiguous()
                works.append(self._pg.send([payload], peer, 2))
                self.counters.add(sent=payload.numel() * payload.element_size(), received=0)
            if recv is not None:
                peer, buf = recv
                works.append(self._pg.recv([buf], peer, 2))
                self.counters.add(sent=0, received=buf.numel() * buf.element_size())
            for w in works:
                w.wait()
        return recv[1] if recv is not None else None

    # -- asynchronous pushes ------------------------------------------------

    async def open_inbox(self, numel: int) -> None:
        if self.size > 1 and self._mailbox is None:
            # A group of its own (every worker builds it here, together), with a
            # long timeout: the receiver idles between pushes.
            self._msg_pg = _group(
                self._store,
                f"gen{self.generation}/msg/",
                self.rank,
                self.size,
                "gloo",
                24 * 3600,
                self._host,
            )
            self._mailbox = _Mailbox(self._msg_pg, numel)

    def post(self, tensor: torch.Tensor, peer: int) -> None:
        if self._mailbox is None:
            raise RuntimeError("open_inbox() must be called by every worker before post()")
        payload = torch.cat([tensor.detach().reshape(-1).cpu(), torch.tensor([self.rank, 0.0])])
        # Each push holds its payload until waited for, and gloo marks a send done
        # only inside wait(): keep the latest MAX_IN_FLIGHT, waiting for the oldest
        # (long landed, unless its peer stopped taking: then this is backpressure,
        # bounded by the group timeout).
        while len(self._sends) >= self._mailbox.limit_in_flight:
            self._sends.popleft().wait(self._timeout)
        self._sends.append(self._msg_pg.send([payload], peer, 1))
        self.counters.add(sent=payload.numel() * payload.element_size(), received=0)

    def inbox(self) -> list[Message]:
        if self._mailbox is None:
            return []
        time.sleep(0)  # hand the GIL to the receiver thread once per step
        msgs = self._mailbox.take()
        for _, t in msgs:
            self.counters.add(sent=0, received=t.numel() * t.element_size())
        return msgs

    async def tick(self) -> None:
        return None

    async def drain(self) -> list[Message]:
        """Flush own pushes, stop the receiver, return what arrived meanwhile."""
        box = self._mailbox
        if box is None:
            return []
        box.drain_mode()
        self._arrive("drained")
        with self.counters.waiting():
            for w in self._sends:  # completes as peers' receivers take them
                # Bounded: a dead peer fails the drain (and the elastic loop regroups)
                # within the group timeout, not the message group's 24 h.
                w.wait(self._timeout)
            self._sends.clear()
            await self.all_reduce_mean(torch.zeros(1))  # every push has landed
            stop = torch.zeros(box.numel + 2)
            stop[-1] = 1.0
            peer = (self.rank + 1) % self.size
            for w in [self._msg_pg.send([stop], peer, 1) for _ in range(box.depth)]:
                w.wait()
            box.join()
        return self.inbox()

    def _arrive(self, name: str) -> None:
        """Wait on the store until every member reached this point: members finish
        their rounds at different times (a step-counted asynchronous run), and a
        wait on the store, unlike a collective, has no timeout to break the
        generation. Abandoning the generation ends it (RuntimeError)."""
        key = f"gen{self.generation}/{name}"
        count = int(self._store.add(key, 1))
        said = time.monotonic()
        while count < self.size:
            if self._abandoned:
                raise RuntimeError(f"generation {self.generation} abandoned while waiting")
            if time.monotonic() - said > 30:
                print(
                    f"dtj-trainer: {count} of {self.size} members have finished their rounds; "
                    "waiting for the others",
                    flush=True,
                )
                said = time.monotonic()
            time.sleep(0.05)
            count = int(self._store.add(key, 0))

    def abandon(self) -> None:
        """Leave this generation so that nobody waits on us: close every connection.

        Neither abort() nor shutdown() closes gloo's connections, but a wait
        that times out does (for that peer), and a peer whose connection
        closes fails its pending operations at once. So a receive from each
        peer with a 1 ms timeout makes everyone still blocked in this
        generation move on within milliseconds. Safe to call from another
        thread, and more than once.
        """
        self._abandoned = True
        for pg in (self._pg, self._msg_pg):
            if pg is None:
                continue
            for peer in range(self.size):
                if peer == self.rank:
                    continue
                with contextlib.suppress(RuntimeError):
                    pg.recv([torch.zeros(1)], peer, ABANDON_TAG).wait(timedelta(milliseconds=1))

    def close(self) -> None:
        self._pg = None
        self._msg_pg = None
