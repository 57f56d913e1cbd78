"""The asynchronous push path of DistTransport: two real gloo ranks, in threads."""

from __future__ import annotations

import asyncio
import threading

import torch
import torch.distributed as dist
from dtj_trainer.transport import MAX_IN_FLIGHT, DistTransport, slots


def _pair(timeout: float = 10.0, numel: int = 4) -> list[DistTransport]:
    store = dist.HashStore()
    out: list[DistTransport | None] = [None, None]

    def make(rank: int) -> None:
        t = DistTransport(store, generation=0, rank=rank, size=2, timeout=timeout, host="127.0.0.1")
        asyncio.run(t.open_inbox(numel))
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


def test_a_receiver_that_does_not_take_holds_its_senders_back_with_bounded_memory():
    numel = 1 << 14  # 64 KiB payloads
    a, b = _pair(numel=numel)
    box = b._mailbox
    assert box is not None
    total = box.limit + box.depth + box.limit_in_flight + 50
    sent = [0]

    def push() -> None:
        for i in range(total):
            a.post(torch.full((numel,), float(i)), 1)
            sent[0] += 1

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    pusher.join(timeout=5)
    assert pusher.is_alive(), "the sender never felt the receiver's full queue"
    assert box.queued() <= box.limit, "the receive queue grew past its bound"
    assert sent[0] < total
    got: list[float] = []
    for _ in range(20_000):
        got += [float(m[0]) for _, m in b.inbox()]
        if len(got) == total:
            break
        threading.Event().wait(0.001)
    pusher.join(timeout=10)
    assert got == [float(i) for i in range(total)], "lost or reordered under back-pressure"


def test_buffers_are_bounded_by_bytes_for_large_models():
    assert slots(4, 64) == 64  # small models: the count bounds
    assert slots(100_000_000, 64) == 2  # 400 MB payloads: never more than two
    assert slots(8_000_000, 256) == 8  # 32 MB payloads within 256 MiB
