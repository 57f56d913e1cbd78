"""The coordinator's membership decisions (dtj_trainer.membership.Registrar), with a fake store."""

from __future__ import annotations

import datetime
import json
import threading

import pytest
import torch.distributed as dist
from dtj_trainer import membership


class FakeStore:
    """The TCPStore calls the registrar makes, on a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        return self.data[key]

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def append(self, key: str, value: str) -> None:
        self.data[key] = self.data.get(key, b"") + value.encode()

    def add(self, key: str, amount: int) -> int:
        value = int(self.data.get(key, b"0")) + amount
        self.data[key] = str(value).encode()
        return value

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        if self.data.get(key, b"") == expected.encode():
            self.data[key] = desired.encode()
        return self.data[key]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def request(store: FakeStore, **kw: object) -> None:
    store.append(membership.REQUESTS, json.dumps(kw) + "\n")


def beat(store: FakeStore, *members: str) -> None:
    for m in members:
        store.add(f"hb/{m}", 1)


def registrar(store: FakeStore, clock: Clock, **kw: int) -> membership.Registrar:
    args = {"min_members": 3, "expected": 4, **kw}
    return membership.Registrar(store, clock=clock, log=lambda _: None, **args)


def test_the_first_generation_waits_for_the_expected_workers():
    store, clock = FakeStore(), Clock()
    reg = registrar(store, clock)
    for m in ("0.a", "1.b", "2.c"):
        request(store, join=m)
        beat(store, m)
    assert reg.step() is None  # 3 of 4, not yet 30 s
    request(store, join="3.d")
    gen = reg.step()
    assert gen is not None and gen.number == 0 and not gen.paused
    assert gen.members == ("0.a", "1.b", "2.c", "3.d")
    assert membership.read_current(store) == gen


def test_without_all_workers_it_starts_after_the_startup_wait_with_min_members():
    store, clock = FakeStore(), Clock()
    reg = registrar(store, clock)
    for m in ("0.a", "1.b", "2.c"):
        request(store, join=m)
    reg.step()
    clock.now = 31
    beat(store, "0.a", "1.b", "2.c")
    gen = reg.step()
    assert gen is not None and len(gen.members) == 3 and not gen.paused


def started(store: FakeStore, clock: Clock) -> membership.Registrar:
    reg = registrar(store, clock)
    for m in ("0.a", "1.b", "2.c", "3.d"):
        request(store, join=m)
        beat(store, m)
    reg.step()
    return reg


def test_a_leaver_is_dropped_at_once_and_below_min_the_generation_pauses():
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)
    request(store, leave="3.d")
    gen = reg.step()
    assert gen.number == 1 and gen.members == ("0.a", "1.b", "2.c") and not gen.paused
    assert not reg.paused
    request(store, leave="2.c")
    gen = reg.step()
    assert gen.members == ("0.a", "1.b") and gen.paused
    assert reg.paused  # what the coordinator reports in status.progress.paused


def test_a_silent_member_is_dropped_after_dead_after_seconds():
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)
    clock.now = 4
    beat(store, "0.a", "1.b", "2.c")  # 3.d stopped
    assert reg.step() is None
    clock.now = 6
    beat(store, "0.a", "1.b", "2.c")
    gen = reg.step()
    assert gen.members == ("0.a", "1.b", "2.c")


def test_a_replacement_evicts_the_old_incarnation_of_its_slot():
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)
    request(store, join="3.e")  # slot 3's replacement: the old incarnation is gone
    beat(store, "3.e")
    gen = reg.step()
    assert gen.members == ("0.a", "1.b", "2.c", "3.e")  # all expected there: at once


def test_joiners_short_of_the_expected_size_settle_before_they_are_admitted():
    store, clock = FakeStore(), Clock()
    reg = registrar(store, clock, expected=6)
    for m in ("0.a", "1.b", "2.c", "3.d"):
        request(store, join=m)
    reg.step()
    clock.now = 31
    beat(store, "0.a", "1.b", "2.c", "3.d")
    assert len(reg.step().members) == 4
    request(store, join="4.f")
    beat(store, "4.f")
    assert reg.step() is None  # more may come: wait `settle`
    clock.now = 32.5
    beat(store, "0.a", "1.b", "2.c", "3.d", "4.f")
    assert reg.step().members[-1] == "4.f"


def test_a_reform_request_re_forms_the_same_members_after_the_heartbeat_grace():
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)
    request(store, reform="1.b")
    assert reg.step() is None
    clock.now = 5.5
    beat(store, "0.a", "1.b", "2.c", "3.d")
    gen = reg.step()
    assert gen.number == 1 and gen.members == ("0.a", "1.b", "2.c", "3.d")


def test_a_new_coordinator_continues_the_numbering_of_the_old_one():
    store, clock = FakeStore(), Clock()
    reg = registrar(store, clock)
    for m in ("0.a", "1.b", "2.c", "3.d"):
        request(store, join=m, after=7)
        beat(store, m)
    gen = reg.step()
    assert gen.number == 8


def test_a_member_dropped_while_frozen_asks_back_in_and_is_readmitted():
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)
    me = membership.Member(store, store, slot=3)
    me.id, me.generation = "3.d", 0  # admitted to generation 0, then frozen (SIGSTOP)
    clock.now = 6
    beat(store, "0.a", "1.b", "2.c")
    assert reg.step().members == ("0.a", "1.b", "2.c")
    said: list[str] = []
    with pytest.raises(TimeoutError):
        me.wait_for(0, timeout=0.05, say=said.append)
    assert "dropped this worker" in said[0]
    beat(store, "3.d")  # thawed: its heartbeat moves again
    clock.now = 7.5
    gen = reg.step()
    assert gen.members == ("0.a", "1.b", "2.c", "3.d")
    assert me.wait_for(0, timeout=1, say=said.append) == gen


GEN5 = membership.Generation(5, ("0.a", "1.b", "2.c"))


def test_the_last_member_to_arrive_completes_the_assembly():
    store = FakeStore()
    store.add("assembly/5", 2)  # two members are already waiting
    membership.assemble(store, GEN5, timeout=1, newest=lambda: 5)
    assert store.add("assembly/5", 0) == 3


def test_a_generation_replaced_while_assembling_is_given_up_by_everyone():
    store = FakeStore()
    with pytest.raises(membership.Superseded, match="generation 6 replaced it"):
        membership.assemble(store, GEN5, timeout=30, newest=lambda: 6)
    store.add("assembly/5", 1)  # a second member had arrived meanwhile
    # A member arriving late never forms it, even before it sees generation 6.
    with pytest.raises(membership.Superseded, match="given up by another member"):
        membership.assemble(store, GEN5, timeout=30, newest=lambda: 5)


def test_a_member_missing_for_the_whole_timeout_gives_the_generation_up():
    store = FakeStore()
    with pytest.raises(membership.Superseded, match="within 0s"):
        membership.assemble(store, GEN5, timeout=0.1, newest=lambda: 5)


class RacingStore(FakeStore):
    """The last member arrives between a give-up's read and its compare-and-set."""

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        self.add(key, 1)
        return super().compare_set(key, expected, desired)


def test_a_give_up_that_loses_the_race_to_the_last_arrival_forms_the_generation():
    store = RacingStore()
    store.add("assembly/5", 1)
    membership.assemble(store, GEN5, timeout=30, newest=lambda: 6)
    assert store.add("assembly/5", 0) == 3


def test_assembly_on_a_real_store_forms_or_gives_up_for_all_members_alike():
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10), use_libuv=True
    )
    newest = {"n": 5}
    outcomes: dict[str, str] = {}

    def member(name: str, gen: membership.Generation) -> None:
        try:
            membership.assemble(store, gen, timeout=30, newest=lambda: newest["n"])
            outcomes[name] = "formed"
        except membership.Superseded:
            outcomes[name] = "given up"

    two = membership.Generation(5, ("0.a", "1.b"))
    threads = [threading.Thread(target=member, args=(m, two)) for m in two.members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcomes == {"0.a": "formed", "1.b": "formed"}

    three = membership.Generation(6, ("0.a", "1.b", "2.c"))  # 2.c never comes
    threads = [threading.Thread(target=member, args=(m, three)) for m in ("0.a", "1.b")]
    for t in threads:
        t.start()
    newest["n"] = 7
    for t in threads:
        t.join(10)
    assert outcomes == {"0.a": "given up", "1.b": "given up"}


def test_a_scale_down_without_min_replicas_unpauses_the_job():
    """Issue 18, finding 7: minReplicas defaults to replicas; after `kubectl scale` 4 -> 2
    the registrar kept the old minimum and the job stayed paused for ever."""
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)  # min 3 of 4 here; a quickstart has min = replicas
    reg.resize(min_members=4, expected=4)
    for m in ("3.d", "2.c"):  # the scaled-down slots' workers leave (SIGTERM)
        request(store, leave=m)
    gen = reg.step()
    assert gen.members == ("0.a", "1.b") and gen.paused
    assert reg.step() is None  # nothing changes by itself
    reg.resize(min_members=2, expected=2)  # the coordinator read the new spec
    gen = reg.step()
    assert gen is not None and gen.members == ("0.a", "1.b") and not gen.paused
    reg.resize(min_members=2, expected=2)
    assert reg.step() is None, "an unchanged spec publishes nothing"


def test_a_raised_minimum_pauses_a_training_generation():
    store, clock = FakeStore(), Clock()
    reg = started(store, clock)
    reg.resize(min_members=5, expected=6)
    gen = reg.step()
    assert gen is not None and gen.paused and len(gen.members) == 4
