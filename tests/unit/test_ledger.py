"""The data ledger: chunks, leases, hand-backs, drops and a coordinator's replacement.

Readers share one in-process store and a Service stepped on demand (the real
request and grant protocol, without threads); each test records the indices
every reader trained and checks the invariant itself: each sample once per
epoch, except the chunk a dropped reader had begun (counted as reissued).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch.distributed as dist
from dtj_trainer import ledger
from dtj_trainer.ledger import Ledger, Plan, Reader, Service


def test_plan_covers_every_sample_once_per_epoch() -> None:
    plan = Plan.even(1000, 64, seed=3)
    for epoch in range(3):
        seen = np.concatenate([plan.samples(plan.fresh(epoch, p)) for p in range(plan.chunks)])
        assert sorted(seen.tolist()) == list(range(1000))
    first = [plan.chunk_at(e, 0) for e in range(5)]
    assert len(set(first)) > 1  # each epoch its own order
    assert Plan.from_wire(plan.wire()) == plan
    shards = Plan.of_sizes([5, 9, 1], seed=1)
    assert Plan.from_wire(shards.wire()) == shards
    assert sorted(shards.samples((0, 1, 0, 9)).tolist()) == list(range(5, 14))


def test_ledger_hands_back_and_reissues() -> None:
    book = Ledger(Plan.even(100, 10))
    a = book.lease("a", 2)
    b = book.lease("b", 1)
    assert book.cursor == 3 and len({it[1] for it in a + b}) == 3
    book.hand_back("a", [(a[0][0], a[0][1], 4, 10), a[1]])  # a trained 4 of its first
    assert book.handed_back == 16 and "a" not in book.leases
    assert book.lease("c", 1) == [(0, a[0][1], 4, 10)]  # the remainder comes first
    assert book.drop("b") == 10 and book.reissued == 10
    assert book.lease("c", 2)[0] == a[1]


def test_reseeded_takes_each_members_word_and_keeps_the_unheards_leases() -> None:
    book = Ledger(Plan.even(100, 10))
    book.lease("a", 1)
    book.lease("b", 1)
    copy = book.snapshot()
    book.lease("a", 1)  # granted after the newest copy: a's word has it
    new = Ledger.reseeded(book.plan, [copy], {"a": book.held("a")})
    assert new.held("a") == book.held("a")
    assert new.held("b") == book.held("b") and new.pool == [] and new.reissued == 0
    assert new.unheard({"a"}) == {"b"}
    assert new.version > copy["version"]


class Job:
    """Readers of one job over one store, with the coordinator's service."""

    def __init__(self, plan: Plan, **service: object) -> None:
        self.plan = plan
        self.store = dist.HashStore()
        self.service = Service(self.store, log=lambda m: None, **service)  # type: ignore[arg-type]
        self.trained: dict[str, list[int]] = {}

    def reader(self, member: str) -> Reader:
        self.trained.setdefault(member, [])
        return Reader(self.plan, lambda: self.store, lambda: member, pump=self.pump, timeout=5)

    def pump(self) -> None:
        self.service.step()

    def train(self, r: Reader, member: str, batch: int, rounds: int) -> None:
        for _ in range(rounds):
            idx = r.take(batch)
            r.commit()
            self.trained[member].extend(idx.tolist())

    def counts(self) -> Counter[int]:
        return Counter(i for seen in self.trained.values() for i in seen)

    def replace_coordinator(self, readers: list[Reader], members: list[str]) -> None:
        self.store = dist.HashStore()  # the new coordinator's store is empty
        self.service = Service(self.store, members=lambda: members, log=lambda m: None)
        for r in readers:
            r.reseed(now=True)


def test_uneven_readers_train_each_sample_once_per_epoch() -> None:
    job = Job(Plan.even(997, 25, seed=1))
    readers = {m: job.reader(m) for m in "abc"}
    # a is 3x faster than c: it takes 3x the batches, and still no sample repeats
    for _ in range(18):
        job.train(readers["a"], "a", 9, 3)
        job.train(readers["b"], "b", 9, 2)
        job.train(readers["c"], "c", 9, 1)
    counts = job.counts()
    assert sum(counts.values()) == 18 * 6 * 9 < 997 and max(counts.values()) == 1
    assert len(job.trained["a"]) == 3 * len(job.trained["c"])


def test_rollback_gives_the_same_samples_again() -> None:
    job = Job(Plan.even(100, 10))
    r = job.reader("a")
    first = r.take(7)
    r.rollback()
    assert r.take(7).tolist() == first.tolist()
    r.commit()
    assert not set(r.take(7).tolist()) & set(first.tolist())


def test_leave_crash_join_and_coordinator_in_one_epoch() -> None:
    size = 2000
    job = Job(Plan.even(size, 40, seed=5))
    members = ["0.a", "1.a", "2.a", "3.a"]
    readers = {m: job.reader(m) for m in members}

    def everyone(rounds: int) -> None:
        for _ in range(rounds):
            for m in list(members):
                job.train(readers[m], m, 16, 1)

    everyone(3)
    readers["1.a"].hand_back()  # SIGTERM: the rest of its chunks go back
    members.remove("1.a")
    everyone(3)
    job.train(readers["2.a"], "2.a", 16, 1)  # a crash mid-chunk: its chunk comes again
    ledger.submit(job.store, {"op": "drop", "m": "2.a"})
    members.remove("2.a")
    for m in ("4.b", "5.b"):  # scale up: new workers simply lease
        members.append(m)
        readers[m] = job.reader(m)
    everyone(3)
    job.replace_coordinator([readers[m] for m in members], list(members))
    everyone(4)
    counts = job.counts()
    seen = sum(counts.values())
    assert seen < size  # all of it within the first epoch
    repeated = sum(n - 1 for n in counts.values() if n > 1)
    assert 0 < repeated <= 40 == job.service.book.reissued  # type: ignore[union-attr]
    assert set(counts) <= set(range(size))
    everyone(40)  # and on to the end of the epoch: everything else exactly once
    counts = job.counts()
    first = [i for i, n in counts.items() if n >= 1]
    assert len(first) == size


def test_reader_state_resumes_mid_epoch_on_a_new_coordinator() -> None:
    job = Job(Plan.even(300, 10, seed=2))
    r = job.reader("0.a")
    job.train(r, "0.a", 10, 10)
    state = r.state_dict()
    job.store = dist.HashStore()  # the whole job restarts: a new coordinator, a new member id
    job.service = Service(job.store, members=lambda: ["0.b"], log=lambda m: None)
    again = job.reader("0.b")
    again.load_state_dict(state)
    job.train(again, "0.b", 10, 20)
    counts = Counter(job.trained["0.a"] + job.trained["0.b"])
    assert len(counts) == 300 and max(counts.values()) == 1  # the epoch went on


@pytest.mark.parametrize("wrong", [Plan.even(301, 10), Plan.even(300, 20)])
def test_a_worker_with_another_data_set_gets_nothing(wrong: Plan) -> None:
    job = Job(Plan.even(300, 10))
    job.train(job.reader("a"), "a", 5, 1)
    bad = Reader(wrong, lambda: job.store, lambda: "b", pump=job.pump, timeout=0.2)
    with pytest.raises(TimeoutError, match="granted no data"):
        bad.take(5)


def test_with_dynamic_batching_and_a_3x_slower_worker_every_sample_is_drawn_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """allreduce, dynamic batching, worker 0 three times slower (it gets small batches):
    with the ledger every sample is drawn once per completed epoch; with fixed iid shards
    the slow worker's shard is drawn far less often (the same run, side by side)."""
    from dtj_trainer import data, simulator
    from dtj_trainer.config import TrainerConfig

    def job(split: str) -> TrainerConfig:
        return TrainerConfig.model_validate(
            {
                "job": "uniform",
                "replicas": 4,
                "algorithm": {"name": "allreduce"},
                "batching": {"dynamic": True, "perWorker": 32},
                "training": {
                    "budget": {"epochs": 12},
                    "evalEvery": 50,
                    "dataSplit": {"kind": split},
                },
            }
        )

    done: list[ledger.Item] = []
    real_done = Ledger.done

    def record(self: Ledger, member: str, item: ledger.Item) -> ledger.Item | None:
        lease = real_done(self, member, item)
        if lease is not None:
            done.append(lease)  # the whole lease: its samples are all trained now
        return lease

    monkeypatch.setattr(Ledger, "done", record)
    # Modelled compute per sample: a step's time grows with its batch (a tiny model's
    # step is all fixed overhead, which gives the plan nothing to balance).
    _, workers = simulator.simulate(job("ledger"), slowdowns={0: 3.0}, sample_seconds=2e-4)
    batches = [w.local.batch for w in workers]
    assert batches[0] < min(batches[1:]), batches  # the plan moved work to the fast
    plan = workers[0].local.sampler.reader.plan  # type: ignore[attr-defined]
    per_epoch = Counter[int]()
    for item in done:
        per_epoch[item[0]] += item[3] - item[2]
    complete = {e for e, n in per_epoch.items() if n == plan.size}  # every chunk done
    draws = np.zeros(plan.size, dtype=np.int64)
    for item in done:
        if item[0] in complete:
            np.add.at(draws, plan.samples(item), 1)
    epochs = len(complete)
    assert epochs >= 9 and draws.min() == draws.max() == epochs, np.bincount(draws)

    drawn: dict[int, int] = {}
    real_next = data.Sampler.next

    def counted(self: data.Sampler, batch: int) -> tuple[object, object]:
        drawn[id(self)] = drawn.get(id(self), 0) + batch
        return real_next(self, batch)

    monkeypatch.setattr(data.Sampler, "next", counted)
    _, fixed = simulator.simulate(job("iid"), slowdowns={0: 3.0}, sample_seconds=2e-4)
    rates = [drawn[id(w.local.sampler)] / len(w.local.sampler.y) for w in fixed]
    skew = max(rates) / min(rates)
    print(
        f"draws per sample and epoch: ledger {draws.min() / epochs:.2f}-"
        f"{draws.max() / epochs:.2f}; fixed shards, slowest to fastest shard {skew:.2f}x"
    )
    assert skew > 1.5  # what the ledger removes


class Away:
    """A coordinator's store that can be away: every call fails while `down`."""

    def __init__(self, store: dist.Store) -> None:
        self.store, self.down = store, False

    def __getattr__(self, name: str) -> object:
        if self.down:
            raise RuntimeError("DistNetworkError: the client socket has timed out")
        return getattr(self.store, name)


def test_a_reader_waits_out_a_coordinator_replaced_under_its_requests() -> None:
    """The coordinator goes away while a reader waits for a grant, and its requests queue
    meanwhile; they reach the replacement before the reader hears of it (its store client
    reconnects first), so a lease it asked for is granted there and the reader, reseeding,
    asks again: the grant it never read is taken up from the ledger's view. No call fails,
    and every sample of the epoch is trained exactly once."""
    plan = Plan.even(600, 20, seed=4)
    job = Job(plan)
    store = Away(job.store)
    said: list[str] = []

    def pump() -> None:  # the coordinator's service, while there is one
        if not store.down:
            job.pump()

    r = Reader(plan, lambda: store, lambda: "0.a", pump=pump, timeout=5, say=said.append)
    trained: list[int] = []

    def train(rounds: int) -> None:
        for _ in range(rounds):
            trained.extend(r.take(8).tolist())
            r.commit()

    train(5)
    store.down = True  # the coordinator is lost: reports and a lease request queue up
    train(2)
    assert r._unsent and any(req["op"] == "lease" for req in r._unsent)
    assert any("coordinator is away" in s for s in said)
    store.store = dist.HashStore()  # the replacement: the client reconnects to it ...
    job.store, store.down = store.store, False
    job.service = Service(store.store, members=lambda: ["0.a"], log=lambda m: None)
    r.commit()  # ... and what waited goes there (the lease request is granted)
    job.pump()
    r.reseed(now=True)  # ... then the worker hears of the new coordinator
    job.pump()
    while len(trained) < plan.size:
        train(1)
    counts = Counter(trained[: plan.size])
    assert len(counts) == plan.size and max(counts.values()) == 1


def test_a_dataloader_loading_ahead_trains_each_sample_once() -> None:
    """job.batches(num_workers=2): a DataLoader draws index batches ahead of their use.
    A commit reports only the batches the round took; a failed round gives the same
    batch again (what was loaded ahead is dropped and drawn again); a re-plan reaches
    the batches drawn after it; a hand-back returns everything not trained."""
    from dtj_trainer import data
    from dtj_trainer.loader import Loaded

    plan = Plan.even(480, 20, seed=2)
    job = Job(plan)
    r = job.reader("0.a")
    sampler = data.LedgerSampler(data.Indices(480), data.Indices(480), r)
    feed = Loaded(list(range(480)), sampler, torch_collate, num_workers=2, pin_memory=False)
    trained: list[int] = []
    sizes: list[int] = []
    try:
        for step in range(30):
            batch, n = feed.next(8 if step < 10 else 12)
            assert n == len(batch)
            sizes.append(n)
            if step in (4, 17):  # the round failed: the same batch comes again
                sampler.rollback()
                again, _ = feed.next(8 if step < 10 else 12)
                assert again.tolist() == batch.tolist()
                batch = again
            trained.extend(batch.tolist())
            sampler.commit()
        assert r.pending > 0  # batches loaded ahead, not trained
        sampler.hand_back()  # leaving: they go back to the ledger
    finally:
        feed.close()
    assert 8 in sizes and sizes[-1] == 12  # the new size once the old draws are used
    job.pump()
    book = job.service.book
    assert book is not None and not book.leases
    rest = [i for it in book.pool for i in plan.samples(it).tolist()]
    rest += [i for p in range(book.cursor, plan.chunks) for i in plan.samples(plan.fresh(0, p))]
    counts = Counter(trained + rest)
    assert len(counts) == 480 and max(counts.values()) == 1  # trained once, or still there


def torch_collate(items: list[int]) -> object:
    import torch

    return torch.tensor(items)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_member_late_to_a_new_coordinator_keeps_its_chunks_and_a_lost_one_loses_them() -> None:
    """Issue 20 (seen in the multi-process ledger test under load): a replacement
    coordinator that stopped waiting for the members' copies after its seeding wait
    gave the chunks of those it had not heard from to others, while they, slow to
    regroup, went on training them: trained twice, not counted. Now their leases
    stay theirs until they speak, or, for one that never does, until the unheard
    wait is over (then they go to others, counted as reissued)."""
    clock = Clock()
    job = Job(Plan.even(2000, 40, seed=4))
    members = ["0.a", "1.a", "2.a"]
    readers = {m: job.reader(m) for m in members}
    for m in reversed(members):  # the others' copies know of 2.a's leases
        job.train(readers[m], m, 16, 2)
    job.store = dist.HashStore()
    job.service = Service(
        job.store, members=lambda: [], seed_wait=5, unheard_wait=60, clock=clock, log=lambda m: None
    )
    readers["0.a"].reseed(now=True)
    job.pump()
    clock.now = 6.0  # past the seeding wait: 1.a and 2.a unheard
    job.pump()
    book = job.service.book
    assert book is not None and book.unheard({"0.a"}) == {"1.a", "2.a"}
    for _ in range(6):
        job.train(readers["0.a"], "0.a", 16, 1)
    readers["1.a"].reseed()  # 1.a speaks, late, and goes on from what it holds
    for _ in range(6):
        for m in ("0.a", "1.a"):
            job.train(readers[m], m, 16, 1)
    assert max(job.counts().values()) == 1 and book.reissued == 0
    clock.now = 70.0  # 2.a never came back: its leases go to others, counted
    job.pump()
    assert book.reissued == 40 and "2.a" not in book.leases  # the chunk it had begun
    for _ in range(20):
        job.train(readers["0.a"], "0.a", 16, 1)
    counts = job.counts()
    repeated = sum(n - 1 for n in counts.values() if n > 1)
    assert 0 < repeated <= book.reissued
