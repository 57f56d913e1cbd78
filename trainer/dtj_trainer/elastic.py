"""Elastic membership: a job as a sequence of generations from its coordinator.

A worker changes generation between rounds: when the coordinator publishes a
new one (a worker joined, left or died) or a collective fails, the worker
abandons the old generation's groups (so nobody waits on it), joins the new
one and runs one state sync with its members: a weighted average of the
members' models plus the models handed off by workers that left, in which a
joiner has weight 0 and takes the members' step (a warm start, not step 0).
Then each method starts afresh on the new group: dpsgd and allreduce re-derive
their schedules, GoSGD's weights restart at 1/n (sum 1), DASGD forgets
in-flight messages of the old generation, Teleportation draws from the live
set. The job's counters (its sample count, start time, end) live in the
coordinator's store, and a new coordinator gets them back from the members.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from . import algorithms, checkpoint
from .config import ASYNC_ALGORITHMS
from .ledger import Plan, Reader
from .membership import Cancelled, Generation, Member, Superseded, slot_of
from .transport import Transport

if TYPE_CHECKING:
    from .loop import Worker

COORDINATOR_PATIENCE = 10  # x timeoutSeconds a worker waits for a coordinator that is away
DONE_KEY = "job/done"
START_KEY = "job/start"  # when the first worker started training (unix seconds)
SAMPLES_KEY = "job/samples"  # asynchronous methods: the job's samples so far


class Left(Exception):
    """This worker left the job (SIGTERM) after handing its model off."""


class AlreadyDone(Exception):
    """The job's training finished while this worker waited for a generation (it joined
    late, or was away when the others finished): nothing left to do."""


@dataclass
class Elastic:
    """One worker's place in the generations of its job (the `Membership` of real
    processes and of the simulator's membership events)."""

    member: Member
    store: Any
    connect: Callable[[Generation, int], Transport]  # the data plane of a generation
    generation: Generation
    timeout: float
    say: Callable[[str], None] = print
    changed: threading.Event = field(default_factory=threading.Event)
    leaving: threading.Event = field(default_factory=threading.Event)
    synced: tuple[str, ...] = ()  # the members of the last generation that synced
    synced_at: int = -1  # the number of that generation
    pump: Callable[[], None] | None = None  # the simulator's ledger service, stepped inline

    # -- the Membership protocol (members.py) ---------------------------------------

    def shard_parts(self, replicas: int, world: int, slot: int) -> int:
        return max(replicas, slot + 1)  # a slot beyond replicas (scale-up) gets its own

    def reader(self, plan: Plan) -> Reader:
        return Reader(
            plan,
            lambda: self.store,
            lambda: self.member.id,
            timeout=COORDINATOR_PATIENCE * self.timeout,
            pump=self.pump,
            say=self.say,
        )

    async def begin(self, w: Worker) -> None:
        if w.pace.consumed:
            reseed(w, self.store)  # the job's count goes on from the checkpoint
        await self.regroup(w)  # the first generation; a joiner warm-starts here
        w.started = job_start(self.store)

    async def between_rounds(self, w: Worker) -> algorithms.Algorithm | None:
        if self.leaving.is_set():
            await self.leave(w)
        if self.changed.is_set() and self.newer_exists():
            return await self.regroup(w)
        return None

    async def recover(self, w: Worker, error: Exception, doing: str) -> algorithms.Algorithm:
        self.say(f"{doing} interrupted ({str(error).splitlines()[0][:120]}); regrouping")
        return await self.regroup(w)

    def count_samples(self, w: Worker, new: int) -> int:
        return int(self.store.add(SAMPLES_KEY, new))

    def speeds(self, w: Worker, own: float) -> list[float] | None:
        self.store.set(f"speed/{w.slot}", f"{own}")
        out = []
        for member in self.generation.members:
            key = f"speed/{slot_of(member)}"
            out.append(float(self.store.get(key)) if self.store.check([key]) else 0.0)
        return out

    def search_over(self, started: float) -> None:
        self.store.set(START_KEY, repr(started))

    def ended(self, step: int) -> None:
        patiently(lambda: self.store.set(DONE_KEY, str(step)), self, "the job's end")

    def roster(self, size: int) -> tuple[int | None, int]:
        return self.generation.number, len(self.generation.members)

    # -- generations ----------------------------------------------------------------

    def handoff_key(self, member: str) -> str:
        return f"handoff/{member}"

    def newer_exists(self) -> bool:
        """Whether a generation newer than ours is published (the watchdog's hint, checked).
        A coordinator that does not answer counts as yes: `regroup` waits for it."""
        self.changed.clear()
        try:
            newest = self.member.current()
        except RuntimeError:
            return True
        return newest is not None and newest.number > self.generation.number

    def _should_stop_waiting(self) -> bool:
        """SIGTERM, or the job's training is over (the others wrote their result)."""
        return self.leaving.is_set() or bool(self.store.check([DONE_KEY]))

    async def regroup(self, w: Worker) -> algorithms.Algorithm:
        """Move `w` to the next generation it is in; returns the method for it.

        Retried until a state sync succeeds: another member may vanish meanwhile.
        A coordinator that is away (being replaced) is waited for, saying so, up to
        COORDINATOR_PATIENCE x timeoutSeconds; then the worker gives up with an error."""
        patience = COORDINATOR_PATIENCE * self.timeout
        away_since: float | None = None
        while True:
            w.transport.abandon()
            self.changed.clear()
            try:
                newest = self.member.current()
                if newest is None or newest.number <= self.generation.number:
                    self.member.request_reform()  # nothing changed that the registrar saw
                gen = self.member.wait_for(
                    self.generation.number, self.timeout, self.say, self._should_stop_waiting
                )
            except Cancelled:
                if self.leaving.is_set():
                    await self.leave(w)
                raise AlreadyDone() from None
            except (TimeoutError, RuntimeError) as e:  # the coordinator is away
                now = time.monotonic()
                away_since = now if away_since is None else away_since
                if now - away_since > patience:
                    raise TimeoutError(
                        f"the job's coordinator has not answered for {patience:.0f}s "
                        f"({str(e).splitlines()[0][:120]}); giving up"
                    ) from e
                self.say(
                    f"no generation yet ({str(e).splitlines()[0][:120]}); the coordinator may "
                    f"be restarting: still waiting (up to {patience:.0f}s in all)"
                )
                time.sleep(min(1.0, self.timeout))
                continue
            away_since = None
            rank = gen.rank_of(self.member.id)
            assert rank is not None
            w.transport.close()
            self.generation = gen
            try:
                self.member.assemble(gen, self.timeout)
                w.transport = self.connect(gen, rank)
                await self.sync_state(w, [m for m in self.synced if m not in gen.members])
            except Superseded as e:
                self.say(f"{e}; moving on")
                continue
            except RuntimeError as e:
                self.say(f"generation {gen.number} broke while forming ({str(e)[:100]}); again")
                continue
            self.synced = gen.members
            self.synced_at = gen.number
            # Members compare notes at the same rounds again (all are at this step).
            w.pace.next_check = w.pace.last_check = w.current_step
            break
        self.say(
            f"generation {gen.number}: rank {rank} of {len(gen.members)}, step {w.current_step}"
        )
        w.algo = w.make_algorithm(len(gen.members))
        await w.algo.setup(w.local)
        return w.algo

    async def sync_state(self, w: Worker, departed: list[str]) -> None:
        """One sync on a new generation: every member takes the weighted average of the
        members' models (parameters and buffers) and of the hand-offs of members that
        left, and a step: synchronous methods the members' latest (a round cut short
        by the change is skipped, so everyone is in step again), asynchronous ones keep
        their own, and a joiner takes the members' mean: a warm start, not step 0.

        Weights: `w.model_weight()`, and 0 for a member that missed generations (it was
        frozen or cut off: its model is stale). A method whose members are replicas
        (allreduce) then copies one member's whole state, optimizer included, to all;
        otherwise a joiner copies the optimizer state of that member."""
        t = w.transport
        n, rank = t.size, t.rank
        info = torch.zeros(3 * n, dtype=torch.float64)
        info[rank], info[n + rank] = w.current_step, w.pace.consumed
        info[2 * n + rank] = self.synced_at + 1  # 0: never synced
        info = (await t.all_reduce_mean(info)) * n
        member_steps = [round(float(v)) for v in info[:n]]
        synced_at = [round(float(v)) - 1 for v in info[2 * n :]]
        current = max(synced_at)
        weight = w.model_weight() if self.synced_at == current else 0.0
        if self.synced_at != current and w.current_step > 0:
            self.say(
                f"this worker missed generations (last in generation {self.synced_at}): "
                "it takes the members' model"
            )
            w.local.sampler.forget()  # dropped: the ledger gave its chunks to others
        x = w.local.state_vector()
        contrib = x * weight
        handoffs = []
        if rank == 0:  # the hand-offs count once
            for member in departed:
                key = self.handoff_key(member)
                if self.store.check([key]):
                    handed = torch.frombuffer(bytearray(self.store.get(key)), dtype=torch.float64)
                    if handed.numel() == x.numel() + 2:  # state, weight, uncounted samples
                        contrib = contrib + handed[:-2].float() * float(handed[-2])
                        weight += float(handed[-2])
                        w.pace.unreported += round(float(handed[-1]))  # counted by us now
                    handoffs.append(key)
        packed = await t.all_reduce_mean(torch.cat([contrib, torch.tensor([weight])]))
        total_w = float(packed[-1]) * n
        if total_w > 0:
            w.local.set_state_vector(packed[:-1] * n / total_w)
        w.pace.consumed = max(round(float(v)) for v in info[n : 2 * n])
        if w.balancer is not None:
            w.balancer.shares = []  # re-planned from the new members' hints and speeds
        trained = [s for s in member_steps if s > 0]
        if trained:
            # The most advanced current member (any trained one if none is current).
            candidates = [r for r in range(n) if member_steps[r] > 0 and synced_at[r] == current]
            source = min(
                candidates or [r for r in range(n) if member_steps[r] > 0],
                key=lambda r: (-member_steps[r], r),
            )
            await _copy_state(w, source, member_steps)
        for key in handoffs:  # taken: the store keeps no model once it is in the average
            self.store.delete_key(key)
        if not trained:
            return
        if w.cfg.algorithm.name not in ASYNC_ALGORITHMS:
            w.current_step = max(trained)
        elif w.current_step == 0:
            w.current_step = round(sum(trained) / len(trained))
        if member_steps[rank] == 0:
            self.say(f"warm start from the members' average model at step {w.current_step}")

    async def leave(self, w: Worker) -> NoReturn:
        """SIGTERM: hand the model (and its weight) to the members, announce, stop."""
        ckpt = w.cfg.training.checkpoint
        if ckpt is not None and w.current_step > 0:  # a suspension loses no step
            checkpoint.save(ckpt.path, w.slot, w.snapshot())
        weight = max(w.model_weight(), 0.0)
        # The samples trained since this worker last counted them travel too, so the
        # job's count loses nothing to a leave (float64: exact for any count).
        tail = torch.tensor([weight, float(w.pace.unreported)], dtype=torch.float64)
        payload = torch.cat([w.local.state_vector().double(), tail])
        self.store.set(self.handoff_key(self.member.id), payload.numpy().tobytes())
        w.local.sampler.hand_back()  # the data it did not train goes back to the ledger
        self.member.leave()
        w.transport.abandon()
        self.say(f"left at step {w.current_step}, model handed off to the members")
        raise Left()


async def _copy_state(w: Worker, source: int, member_steps: list[int]) -> None:
    """Copy `source`'s optimizer state (and, for replicas, its buffers and parameters)
    to the members that need it: all members for a method whose members are replicas,
    else the joiners. One broadcast, only when needed."""
    t = w.transport
    replicas = algorithms.replicates(w.cfg.algorithm)
    takers = [r for r in range(t.size) if replicas or member_steps[r] == 0]
    if not takers or takers == [source]:
        return
    blob = torch.zeros(0, dtype=torch.uint8)
    if t.rank == source:
        blob = checkpoint.to_bytes(w.local.full_state(with_model=replicas))
    size = await t.broadcast(torch.tensor([blob.numel()], dtype=torch.int64), source)
    if t.rank != source:
        blob = torch.zeros(int(size[0]), dtype=torch.uint8)
    blob = await t.broadcast(blob, source)
    if t.rank in takers and t.rank != source:
        w.local.load_full_state(checkpoint.from_bytes(blob))


def job_start(store: Any, now: float | None = None) -> float:
    """When the job started training: the first worker's clock, shared by the store
    (the wall-clock budget counts from it, also for workers that join later).
    compare_set with an empty expected value sets the key only if it is absent."""
    store.compare_set(START_KEY, "", repr(time.time() if now is None else now))
    return float(store.get(START_KEY))


def reseed(w: Worker, store: Any) -> None:
    """A new coordinator (the old one was lost) starts with an empty store: put back
    what `w` knows of the job's counters, so budgets are not counted again from zero
    and a finished job stays finished. Each member does it; the largest sample count
    wins, and the first start written stands (members share one)."""
    job_start(store, w.started)
    known = w.pace.consumed  # the count as of its last add; unreported comes later
    while known > 0:
        have = int(store.add(SAMPLES_KEY, 0))
        if have >= known:
            break
        store.compare_set(SAMPLES_KEY, str(have), str(known))
    if w.finished_step is not None:
        store.set(DONE_KEY, str(w.finished_step))
    w.local.sampler.announce(store)  # its copy of the data ledger, now
    w.local.sampler.reseed()  # ... and again at its next batch


def patiently(op: Callable[[], Any], el: Elastic, what: str) -> Any:
    """`op()` on the coordinator's store, waiting out a coordinator that is away (being
    replaced) for up to COORDINATOR_PATIENCE x timeoutSeconds, saying so once."""
    deadline = time.monotonic() + COORDINATOR_PATIENCE * el.timeout
    told = False
    while True:
        try:
            return op()
        except (RuntimeError, TimeoutError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"could not write {what} to the job's coordinator: it has not answered "
                    f"for {COORDINATOR_PATIENCE * el.timeout:.0f}s"
                ) from e
            if not told:
                el.say(f"writing {what}: the coordinator may be restarting; still trying")
                told = True
            time.sleep(1.0)
