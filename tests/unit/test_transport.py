"""The asynchronous push path of DistTransport: two real gloo ranks, in threads."""

from __future__ import annotations

import asyncio
import threading

import torch
import torch.distributed as dist
from dtj_trainer.transport import MAX_IN_FLIGHT, DistTransport


def _pair(timeout: float = 10.0) -> list[DistTransport]:
    store = dist.HashStore()
    out: list[DistTransport | None] = [None, None]

    def make(rank: int) -> None:
        t = DistTransport(store, generation=0, rank=rank, size=2, timeout=timeout, host="127.0.0.1")
        asyncio.run(t.open_inbox(4))
        out[rank] = t

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(out)
    return out  # type: ignore[return-value]


def test_pushes_arrive_in_order_and_only_in_flight_ones_are_kept():
    a, b = _pair()
    for i in range(200):
        a.post(torch.full((4,), float(i)), 1)
    assert len(a._sends) <= MAX_IN_FLIGHT, "every push of the run kept with its payload"
    got: list[float] = []
    for _ in range(2000):
        got += [float(m[0]) for _, m in b.inbox()]
        if len(got) == 200:
            break
        threading.Event().wait(0.001)
    assert got == [float(i) for i in range(200)]

    results: dict[int, object] = {}

    def drain(t: DistTransport) -> None:
        results[t.rank] = asyncio.run(t.drain())

    threads = [threading.Thread(target=drain, args=(t,)) for t in (a, b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert set(results) == {0, 1}
    assert results[1] == []  # type: ignore[comparison-overlap]  # all taken before


def test_pushes_to_a_peer_that_is_gone_fail_instead_of_waiting():
    a, b = _pair(timeout=2.0)
    b.abandon()  # b leaves the generation (killed, or moved on)
    done = threading.Event()
    err: list[BaseException] = []

    def push_and_drain() -> None:
        try:
            for _ in range(2 * MAX_IN_FLIGHT):
                a.post(torch.zeros(4), 1)
            asyncio.run(a.drain())
        except RuntimeError as e:
            err.append(e)
        done.set()

    threading.Thread(target=push_and_drain, daemon=True).start()
    assert done.wait(timeout=30), "pushes to a peer that is gone still wait"
    assert err, "pushes to a peer that is gone looked delivered"
