"""The worker's training loop: it reads like a story, whatever the method.

    build (same seed everywhere) -> algorithm.setup -> for each step:
    algorithm.round, report -> algorithm.finish -> weighted average, evaluate.

It is a coroutine so that the same code runs as a real process
(DistTransport) and as one of many virtual workers in the simulator.

Elastic runs (a real process with an `Elastic`) change membership
generations between rounds: when the coordinator publishes a new generation
(a worker joined, left or died) or a collective fails, the worker abandons
the old generation's groups (so nobody waits on it), joins the new one and
runs one state sync with its members: a weighted average of the members'
models plus the models handed off by workers that left, in which a joiner
has weight 0 and takes the members' step (a warm start, not step 0). Then
each method starts afresh on the new group: dpsgd and allreduce re-derive
their schedules, GoSGD's weights restart at 1/n (sum 1), DASGD forgets
in-flight messages of the old generation, Teleportation draws from the live
set.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import torch
from torch import nn

from . import algorithms, checkpoint, data, models, objective
from .balancer import Balancer, gradient_scales
from .config import ASYNC_ALGORITHMS, TrainerConfig
from .emulation import Emulation
from .membership import Cancelled, Generation, Member, Superseded, slot_of
from .metrics import Progress, Result, StalenessTally
from .pace import Pace
from .transport import Transport

Reporter = Callable[[Progress], None]
VALIDATION_FRACTION = 0.1
DEFAULT_SEARCH_ROUNDS = 300  # teleportation's k search under a budget
COORDINATOR_PATIENCE = 10  # x timeoutSeconds a worker waits for a coordinator that is away


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with objective.evaluating(model):
        return float((objective.logits_of(model(x)).argmax(dim=1) == y).float().mean().item())


def halving_rungs(candidates: int, budget: int) -> list[int]:
    """Rounds per candidate in each rung of a successive-halving search: rung r trains
    ceil(m / 2^r) candidates for b x 2^r rounds until one is left; b is the largest
    that keeps the total within `budget` (at least 1 round)."""
    alive, mult, cost = candidates, 1, 0
    mults = []
    while alive > 1:
        mults.append(mult)
        cost += alive * mult
        alive, mult = (alive + 1) // 2, mult * 2
    if not mults:
        return []  # one candidate: nothing to compare
    base = max(1, budget // cost)
    return [base * m for m in mults]


def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: objective.LossFn) -> float:
    with objective.evaluating(model):
        return float(objective.loss_of(model(x), y, loss_fn).item())


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


@dataclass
class Elastic:
    """What a worker needs to move between membership generations."""

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


class Left(Exception):
    """This worker left the job (SIGTERM) after handing its model off."""


class AlreadyDone(Exception):
    """The job's training finished while this worker waited for a generation (it joined
    late, or was away when the others finished): nothing left to do."""


DONE_KEY = "job/done"
START_KEY = "job/start"  # when the first worker started training (unix seconds)
SAMPLES_KEY = "job/samples"  # asynchronous methods: the job's samples so far


@dataclass
class Worker:
    """One worker's model, data and optimizer, built identically on every rank."""

    cfg: TrainerConfig
    transport: Transport
    local: algorithms.Local
    dataset: data.Dataset | None  # the built-in data set; None in a user's own loop
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    x0: torch.Tensor
    algo: algorithms.Algorithm | None = None
    stop_after: int | None = None  # end the run early after this round (benchmarks)
    current_step: int = 0
    elastic: Elastic | None = None
    slot: int = 0
    k: int | None = None  # teleportation's k for this run
    pace: Pace = field(default_factory=lambda: Pace(rounds=None))
    balancer: Balancer | None = None  # batching.dynamic
    hint: float = 1.0  # this worker's speed hint (its node pool's speed)
    # Asynchronous methods without a store (the simulator): a shared sample counter.
    counter: Callable[[int], int] | None = None
    started: float = field(default_factory=time.time)
    tally: StalenessTally = field(default_factory=StalenessTally)  # dasgd, whole run
    search_log: list[dict[str, float]] = field(default_factory=list)  # teleportation's k search
    finished_step: int | None = None  # set once this worker wrote the job's end

    @classmethod
    def build(
        cls,
        cfg: TrainerConfig,
        transport: Transport,
        *,
        slot: int | None = None,
        elastic: Elastic | None = None,
        hint: float = 1.0,
        emulation: Emulation | None = None,
    ) -> Worker:
        """`slot` picks the data shard (of cfg.replicas); it is the rank in a fixed run.
        `emulation`: modelled hardware (benchmarks, tests, the simulator)."""
        emulation = emulation or Emulation()
        if transport.virtual_time:  # the simulator's asynchronous mode: slowness is a
            emulation = replace(emulation, slowdown=1.0)  # clock tick, not a sleep
        seed = cfg.training.seed
        slot = transport.rank if slot is None else slot
        ds = data.load(cfg.training.dataset, seed)
        n_val = int(VALIDATION_FRACTION * len(ds.y_train))
        x_train, y_train = ds.x_train[n_val:], ds.y_train[n_val:]
        parts = transport.size if elastic is None else max(cfg.replicas, slot + 1)
        shards = data.split(y_train.numpy(), parts, cfg.training.data_split, seed)
        mine = torch.from_numpy(shards[slot])
        torch.manual_seed(seed)  # identical x0 on every worker
        model = models.build(
            cfg.training.model, num_features=ds.num_features, num_classes=ds.num_classes
        )
        opt = objective.build_optimizer(cfg.optimizer, model.parameters())
        sampler = data.Sampler(x_train[mine], y_train[mine], seed=seed * 100_003 + slot)
        local = algorithms.Local(
            model,
            opt,
            sampler,
            cfg.batching.per_worker,
            cfg.optimizer.lr,
            objective.build_loss(cfg.training.loss),
            emulation,
            precision=cfg.training.precision,
            clip_norm=cfg.optimizer.grad_clip_norm,
        )
        balancer = Balancer(cfg.batching) if cfg.batching.dynamic else None
        return cls(
            cfg,
            transport,
            local,
            ds,
            ds.x_train[:n_val],
            ds.y_train[:n_val],
            algorithms.flat_params(model),
            elastic=elastic,
            slot=slot,
            pace=Pace.of(cfg.training, len(y_train)),
            balancer=balancer,
            hint=hint,
        )

    @classmethod
    def for_loop(
        cls,
        cfg: TrainerConfig,
        transport: Transport,
        local: algorithms.Local,
        *,
        train_size: int,
        slot: int,
        elastic: Elastic | None,
        hint: float = 1.0,
    ) -> Worker:
        """A worker whose gradients the user's own loop computes (`local.driver`): no
        built-in data set, the user's model and optimizer in `local`."""
        return cls(
            cfg,
            transport,
            local,
            None,
            None,
            None,
            algorithms.flat_params(local.model),
            elastic=elastic,
            slot=slot,
            pace=Pace.of(cfg.training, train_size),
            balancer=Balancer(cfg.batching) if cfg.batching.dynamic else None,
            hint=hint,
        )

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint holds: everything this worker needs to go on from here
        (its model with buffers, optimizer state, place in its data, step, the job's
        sample count, teleportation's k). `params` is the flat parameter vector."""
        state: dict[str, Any] = {
            "step": self.current_step,
            "samples": self.pace.consumed + self.pace.unreported,
            "params": self.local.params(),
            "model": self.local.model.state_dict(),
            "optimizer": self.local.optimizer.state_dict(),
            "sampler": self.local.sampler.state_dict(),
            **self.local.extras_state(),
        }
        if self.k is not None:
            state["k"] = self.k
        return state

    def resume(self) -> None:
        """Start from the job's checkpoint when there is one (training.checkpoint): after
        a suspension, after every worker was lost, or in a new job pointed at an old
        one's directory. The first generation's state sync then proceeds as after any
        membership change (a slot without a checkpoint of its own takes the most
        advanced one; the members agree on the step)."""
        ckpt = self.cfg.training.checkpoint
        if ckpt is None or (state := checkpoint.latest(ckpt.path, self.slot)) is None:
            return
        if "model" not in state:
            raise ValueError(
                f"{ckpt.path}: a checkpoint of an older version (parameters only) cannot be "
                "resumed from; point training.checkpoint.path elsewhere"
            )
        self.local.model.load_state_dict(state["model"])
        self.local.optimizer.load_state_dict(state["optimizer"])
        self.local.sampler.load_state_dict(state["sampler"])
        self.local.load_extras(state)
        self.current_step = int(state["step"])
        self.pace.consumed = int(state["samples"])
        self.k = state.get("k")
        self.say(
            f"resumed from the checkpoint at step {self.current_step} "
            f"({self.pace.consumed} samples trained by the job)"
        )

    def say(self, message: str) -> None:
        if self.elastic is not None:
            self.elastic.say(message)
        else:
            print(message, flush=True)

    def reset(self) -> None:
        """Back to x0 with a fresh optimizer state (the k search restarts from x0); the
        samples trained so far are the search's cost, not part of the job's budget."""
        self.current_step = 0
        self.local.set_params(self.x0)
        self.local.optimizer.state.clear()
        self.pace.consumed = self.pace.unreported = 0

    async def run(
        self, steps: int | None, *, k: int | None = None, report: Reporter | None = None
    ) -> tuple[float, float]:
        """Train until `steps` rounds, or (None) until the job's budget is spent; returns
        (this model's final weight, samples/s).

        In an elastic run a failed round or a new generation leads to `regroup`
        and training goes on from the same step; SIGTERM leads to `leave`.
        """
        cfg = self.cfg
        self.k = k
        algo = self.make_algorithm(self.transport.size)
        self.algo = algo
        await algo.setup(self.local)
        window_start, window_samples = time.perf_counter(), 0
        run_start, run_samples = window_start, 0
        losses: list[float] = []
        staleness: list[float] = []
        stale: list[int] = []
        rounds = dropped = 0
        pace = self.pace
        pace.next_check = pace.last_check = self.current_step
        notes = steps is None or self.balancer is not None  # sync points wanted
        while steps is None or self.current_step < steps:
            await self.local.round_over()
            el = self.elastic
            if el is not None and el.leaving.is_set():
                await self.leave()
            if el is not None and el.changed.is_set() and el.newer_exists():
                algo = await self.regroup()
            step = self.current_step
            t = self.transport
            if self.local.driver is None:  # a user's loop sets its own learning rate
                objective.set_lr(
                    self.local.optimizer,
                    cfg.optimizer,
                    pace.fraction(step, time.time() - self.started),
                )
            try:
                if notes and step >= pace.next_check and await self.compare_notes(steps):
                    break
                compute = self.local.compute_seconds
                stats = await algo.round(self.local, step)
                if self.balancer is not None:
                    self.balancer.observe(self.local.compute_seconds - compute, stats.samples)
                await t.tick()
                done = step + 1
                distance = None
                last = done == steps
                wants_report = report and (done % cfg.training.eval_every == 0 or last)
                if wants_report and cfg.algorithm.name not in ASYNC_ALGORITHMS:
                    # Synchronous methods reach this step together: two small
                    # all-reduces give the live consensus distance (measured for
                    # allreduce too: replicas that drifted apart must show).
                    weight = algo.state_weight()
                    _, distance = await weighted_average(self.local.params(), weight, t)
            except (RuntimeError, TimeoutError) as e:  # a peer vanished, the coordinator is
                # away (a store call timed out), or we were told to move on
                if el is None:
                    raise
                el.say(f"round {step} interrupted ({str(e).splitlines()[0][:120]}); regrouping")
                algo = await self.regroup()
                continue
            self.current_step = done
            pace.unreported += stats.samples
            window_samples += stats.samples
            run_samples += stats.samples
            if stats.loss is not None and not math.isnan(stats.loss):  # a user's loop: known
                losses.append(stats.loss)  # from its second round on (it reports after)
            if stats.staleness is not None:
                staleness.append(stats.staleness)
            stale.extend(stats.stale)
            self.tally.add(stats.stale, stats.dropped)
            rounds, dropped = rounds + 1, dropped + stats.dropped
            ckpt = cfg.training.checkpoint
            if ckpt and report and (done % ckpt.every_steps == 0 or last):
                checkpoint.save(ckpt.path, self.slot, self.snapshot())
            if report and wants_report:
                now = time.perf_counter()
                report(
                    Progress(
                        rank=self.slot,
                        step=done,
                        loss=sum(losses) / len(losses) if losses else float("nan"),
                        samples_per_second=window_samples / max(now - window_start, 1e-9),
                        test_accuracy=self.test_accuracy(),
                        metrics=self.reported(),
                        bytes_sent=t.counters.bytes_sent,
                        bytes_received=t.counters.bytes_received,
                        comm_wait_seconds=t.counters.wait_seconds,
                        staleness=sum(staleness) / len(staleness) if staleness else None,
                        consensus_distance=distance,
                        time=time.time(),
                        batch=self.local.batch,
                        compute_samples_per_second=self.compute_speed(),
                        job_samples=pace.consumed or None,
                        rounds=rounds,
                        samples=run_samples,
                        dropped=dropped,
                        stale=stale,
                        generation=el.generation.number if el is not None else None,
                        members=len(el.generation.members) if el is not None else t.size,
                    )
                )
                window_start, window_samples, losses, staleness, stale = now, 0, [], [], []
            if report and self.stop_after is not None and done >= self.stop_after:
                break
        await self.local.round_over()
        rate = run_samples / max(time.perf_counter() - run_start, 1e-9)
        if cfg.algorithm.name in ASYNC_ALGORITHMS and pace.unreported:
            # The last rounds count too: the job's count is what was trained.
            pace.consumed = self.count_samples(pace.unreported)
            pace.unreported = 0
        while True:
            try:
                weight = await self.algo.finish(self.local)
                return weight, rate
            except (RuntimeError, TimeoutError):
                if self.elastic is None:
                    raise
                await self.regroup()

    def test_accuracy(self) -> float | None:
        """The built-in data set's test accuracy of this model (None in a user's loop)."""
        ds = self.dataset
        return None if ds is None else accuracy(self.local.model, ds.x_test, ds.y_test)

    def reported(self) -> dict[str, float] | None:
        """What a user's loop last reported (job.report), if any."""
        driver = self.local.driver
        return driver.reported() if driver is not None else None

    # -- the job-wide budget and the batch plan ---------------------------------------

    def compute_speed(self) -> float | None:
        """This worker's measured samples per second of compute (dynamic batching)."""
        if self.balancer is None or not self.balancer.seconds_per_sample:
            return None
        return 1.0 / self.balancer.seconds_per_sample

    async def compare_notes(self, steps: int | None) -> bool:
        """A sync point: count the job's samples and re-plan the batches; True when the
        budget is spent (every member of a synchronous method decides the same)."""
        pace, t, step = self.pace, self.transport, self.current_step
        n, rank = t.size, t.rank
        speed = self.balancer.speed() if self.balancer is not None else 0.0
        if self.cfg.algorithm.name in ASYNC_ALGORITHMS:
            total = self.count_samples(pace.unreported)
            pace.unreported = 0
            pace.consumed = total
            pace.last_check, pace.next_check = step, step + pace.every
            speeds = self.speeds_from_store(speed)
            if speeds is not None:
                self.apply_plan(speeds, [self.hint] * n, rank)
            return steps is None and pace.spent(time.time() - self.started)
        notes = torch.zeros(2 + 2 * n, dtype=torch.float64)
        notes[0], notes[1] = pace.unreported, time.time() - self.started
        notes[2 + rank], notes[2 + n + rank] = speed, self.hint
        shared = (await t.all_reduce_mean(notes)) * n  # identical on every member
        pace.unreported = 0
        self.apply_plan(shared[2 : 2 + n].tolist(), shared[2 + n :].tolist(), rank)
        spent = pace.settle(step, round(float(shared[0])), float(shared[1]) / n)
        return steps is None and spent

    def apply_plan(self, speeds: list[float], hints: list[float], rank: int) -> None:
        """Set this worker's batch and gradient weight from the members' speeds."""
        bal = self.balancer
        if bal is None:
            return
        if len(bal.shares) != len(speeds):  # a new generation: start from the hints
            bal.start(hints)
        plan = bal.replan(speeds)
        self.local.batch = plan[rank]
        # allreduce weights the gradients by batch itself; the others average equally.
        weighs_itself = self.algo is not None and self.algo.weights_batches
        self.local.grad_scale = 1.0 if weighs_itself else gradient_scales(plan)[rank]

    def count_samples(self, new: int) -> int:
        """Asynchronous methods: add this worker's new samples to the job's count."""
        if self.elastic is not None:
            return int(self.elastic.store.add(SAMPLES_KEY, new))
        if self.counter is not None:
            return self.counter(new)
        self.pace.consumed += new
        return self.pace.consumed

    def speeds_from_store(self, own: float) -> list[float] | None:
        """Asynchronous methods: the members' measured speeds, through the job's store."""
        el = self.elastic
        if el is None or self.balancer is None:
            return None
        el.store.set(f"speed/{self.slot}", f"{own}")
        out = []
        for member in el.generation.members:
            key = f"speed/{slot_of(member)}"
            out.append(float(el.store.get(key)) if el.store.check([key]) else 0.0)
        return out

    # -- membership changes (elastic runs) ------------------------------------------

    def model_weight(self) -> float:
        """This model's weight in a state sync: what the method says it holds (GoSGD's
        sum-weight, teleportation's 0 for an idle worker, else 1); 0 before the first
        step (a joiner brings nothing yet)."""
        if self.current_step == 0 or self.algo is None:
            return 0.0
        return self.algo.state_weight()

    async def sync_state(self, departed: list[str]) -> None:
        """One sync on a new generation: every member takes the weighted average of the
        members' models (parameters and buffers) and of the hand-offs of members that
        left, and a step: synchronous methods the members' latest (a round cut short
        by the change is skipped, so everyone is in step again), asynchronous ones keep
        their own, and a joiner takes the members' mean: a warm start, not step 0.

        Weights: `model_weight()`, and 0 for a member that missed generations (it was
        frozen or cut off: its model is stale). A method whose members are replicas
        (allreduce) then copies one member's whole state, optimizer included, to all;
        otherwise a joiner copies the optimizer state of that member."""
        el, t = self.elastic, self.transport
        assert el is not None
        n, rank = t.size, t.rank
        info = torch.zeros(3 * n, dtype=torch.float64)
        info[rank], info[n + rank] = self.current_step, self.pace.consumed
        info[2 * n + rank] = el.synced_at + 1  # 0: never synced
        info = (await t.all_reduce_mean(info)) * n
        member_steps = [round(float(v)) for v in info[:n]]
        synced_at = [round(float(v)) - 1 for v in info[2 * n :]]
        current = max(synced_at)
        w = self.model_weight() if el.synced_at == current else 0.0
        if el.synced_at != current and self.current_step > 0:
            el.say(
                f"this worker missed generations (last in generation {el.synced_at}): "
                "it takes the members' model"
            )
        x = self.local.state_vector()
        contrib, weight = x * w, w
        handoffs = []
        if rank == 0:  # the hand-offs count once
            for member in departed:
                key = el.handoff_key(member)
                if el.store.check([key]):
                    handed = torch.frombuffer(bytearray(el.store.get(key)), dtype=torch.float64)
                    if handed.numel() == x.numel() + 2:  # state, weight, uncounted samples
                        contrib = contrib + handed[:-2].float() * float(handed[-2])
                        weight += float(handed[-2])
                        self.pace.unreported += round(float(handed[-1]))  # counted by us now
                    handoffs.append(key)
        packed = await t.all_reduce_mean(torch.cat([contrib, torch.tensor([weight])]))
        total_w = float(packed[-1]) * n
        if total_w > 0:
            self.local.set_state_vector(packed[:-1] * n / total_w)
        self.pace.consumed = max(round(float(v)) for v in info[n : 2 * n])
        if self.balancer is not None:
            self.balancer.shares = []  # re-planned from the new members' hints and speeds
        trained = [s for s in member_steps if s > 0]
        if trained:
            # The most advanced current member (any trained one if none is current).
            candidates = [r for r in range(n) if member_steps[r] > 0 and synced_at[r] == current]
            source = min(
                candidates or [r for r in range(n) if member_steps[r] > 0],
                key=lambda r: (-member_steps[r], r),
            )
            await self._copy_state(source, member_steps)
        for key in handoffs:  # taken: the store keeps no model once it is in the average
            el.store.delete_key(key)
        if not trained:
            return
        if self.cfg.algorithm.name not in ASYNC_ALGORITHMS:
            self.current_step = max(trained)
        elif self.current_step == 0:
            self.current_step = round(sum(trained) / len(trained))
        if member_steps[rank] == 0:
            el.say(f"warm start from the members' average model at step {self.current_step}")

    async def _copy_state(self, source: int, member_steps: list[int]) -> None:
        """Copy `source`'s optimizer state (and, for replicas, its buffers and
        parameters) to the members that need it: all members for a method whose
        members are replicas, else the joiners. One broadcast, only when needed."""
        t = self.transport
        replicas = algorithms.replicates(self.cfg.algorithm)
        takers = [r for r in range(t.size) if replicas or member_steps[r] == 0]
        if not takers or takers == [source]:
            return
        blob = torch.zeros(0, dtype=torch.uint8)
        if t.rank == source:
            blob = checkpoint.to_bytes(self.local.full_state(with_model=replicas))
        size = await t.broadcast(torch.tensor([blob.numel()], dtype=torch.int64), source)
        if t.rank != source:
            blob = torch.zeros(int(size[0]), dtype=torch.uint8)
        blob = await t.broadcast(blob, source)
        if t.rank in takers and t.rank != source:
            self.local.load_full_state(checkpoint.from_bytes(blob))

    async def regroup(self) -> algorithms.Algorithm:
        """Move to the next generation this worker is in; returns the algorithm for it.

        Retried until a state sync succeeds: another member may vanish meanwhile.
        A coordinator that is away (being replaced) is waited for, saying so, up to
        COORDINATOR_PATIENCE x timeoutSeconds; then the worker gives up with an error."""
        el = self.elastic
        assert el is not None
        patience = COORDINATOR_PATIENCE * el.timeout
        away_since: float | None = None
        while True:
            self.transport.abandon()
            el.changed.clear()
            try:
                newest = el.member.current()
                if newest is None or newest.number <= el.generation.number:
                    el.member.request_reform()  # nothing changed that the registrar saw
                gen = el.member.wait_for(
                    el.generation.number, el.timeout, el.say, self._should_stop_waiting
                )
            except Cancelled:
                if el.leaving.is_set():
                    await self.leave()
                raise AlreadyDone() from None
            except (TimeoutError, RuntimeError) as e:  # the coordinator is away
                now = time.monotonic()
                away_since = now if away_since is None else away_since
                if now - away_since > patience:
                    raise TimeoutError(
                        f"the job's coordinator has not answered for {patience:.0f}s "
                        f"({str(e).splitlines()[0][:120]}); giving up"
                    ) from e
                el.say(
                    f"no generation yet ({str(e).splitlines()[0][:120]}); the coordinator may "
                    f"be restarting: still waiting (up to {patience:.0f}s in all)"
                )
                time.sleep(min(1.0, el.timeout))
                continue
            away_since = None
            rank = gen.rank_of(el.member.id)
            assert rank is not None
            self.transport.close()
            el.generation = gen
            try:
                el.member.assemble(gen, el.timeout)
                self.transport = el.connect(gen, rank)
                await self.sync_state([m for m in el.synced if m not in gen.members])
            except Superseded as e:
                el.say(f"{e}; moving on")
                continue
            except RuntimeError as e:
                el.say(f"generation {gen.number} broke while forming ({str(e)[:100]}); again")
                continue
            el.synced = gen.members
            el.synced_at = gen.number
            # Members compare notes at the same rounds again (all are at this step).
            self.pace.next_check = self.pace.last_check = self.current_step
            break
        el.say(
            f"generation {gen.number}: rank {rank} of {len(gen.members)}, step {self.current_step}"
        )
        self.algo = self.make_algorithm(len(gen.members))
        await self.algo.setup(self.local)
        return self.algo

    def make_algorithm(self, members: int) -> algorithms.Algorithm:
        """The method for a generation of `members`. Teleportation with activeNodes auto
        uses the k found by the search; before it has one (the first generation,
        which the search then replaces), k = members."""
        k = self.k
        if k is None and self.cfg.algorithm.name == "teleportation":
            spec_k = self.cfg.algorithm.active_nodes
            k = spec_k if isinstance(spec_k, int) else members
        k = None if k is None else min(k, members)
        return algorithms.make(self.cfg.algorithm, self.transport, seed=self.cfg.training.seed, k=k)

    def _should_stop_waiting(self) -> bool:
        """SIGTERM, or the job's training is over (the others wrote their result)."""
        el = self.elastic
        assert el is not None
        return el.leaving.is_set() or bool(el.store.check([DONE_KEY]))

    async def leave(self) -> NoReturn:
        """SIGTERM: hand the model (and its weight) to the members, announce, stop."""
        el = self.elastic
        assert el is not None
        ckpt = self.cfg.training.checkpoint
        if ckpt is not None and self.current_step > 0:  # a suspension loses no step
            checkpoint.save(ckpt.path, self.slot, self.snapshot())
        w = max(self.model_weight(), 0.0)
        # The samples trained since this worker last counted them travel too, so the
        # job's count loses nothing to a leave (float64: exact for any count).
        tail = torch.tensor([w, float(self.pace.unreported)], dtype=torch.float64)
        payload = torch.cat([self.local.state_vector().double(), tail])
        el.store.set(el.handoff_key(el.member.id), payload.numpy().tobytes())
        el.member.leave()
        self.transport.abandon()
        el.say(f"left at step {self.current_step}, model handed off to the members")
        raise Left()

    async def search_k(self, budget: int) -> int:
        """Teleportation's k, found within `budget` rounds (the paper's Algorithm 2 finds
        k within 2T iterations in all: this spends <= T before the T rounds of training).

        Successive halving over k in {1, 2, 4, ..., n} (the paper's exact schedule is
        unconfirmed; ALGORITHMS.md): every candidate trains from x0 for b rounds, the
        better half trains again from x0 for 2b, and so on until one is left, with b
        as large as the budget allows (`halving_rungs`). A candidate's score is the mean
        validation loss of the slot models themselves, not of their average: averaging
        hides how far apart the slots are, which is what a large k on a sparse
        topology costs. Every round of every rung is logged in `search_log`.
        """
        n = self.transport.size
        alive = [2**j for j in range(n.bit_length()) if 2**j <= n]
        self.search_log = []
        for rounds in halving_rungs(len(alive), budget):
            scores = {}
            for k in alive:
                self.reset()
                weight, _ = await self.run(rounds, k=k)
                own = 0.0
                if weight > 0:
                    assert self.x_val is not None and self.y_val is not None  # built-in data
                    own = loss_on(self.local.model, self.x_val, self.y_val, self.local.loss_fn)
                mean, _ = await weighted_average(torch.tensor([own]), weight, self.transport)
                scores[k] = float(mean[0])
                self.search_log.append({"k": k, "rounds": rounds, "val_loss": scores[k]})
            alive = sorted(alive, key=lambda k: scores[k])[: (len(alive) + 1) // 2]
        self.reset()
        return alive[0]

    async def train(self, report: Reporter | None = None) -> Result:
        cfg = self.cfg
        self.resume()
        if self.elastic is not None:
            if self.pace.consumed:
                self.reseed(self.elastic.store)  # the job's count goes on from the checkpoint
            await self.regroup()  # the first generation; a joiner warm-starts here
            self.started = self.job_start(self.elastic.store)
        else:
            await self.transport.all_reduce_mean(torch.zeros(1))  # start together
            self.started = time.time()
        start = time.perf_counter()
        k = self.k  # resumed
        auto = cfg.algorithm.name == "teleportation" and cfg.algorithm.active_nodes == "auto"
        if auto and k is None:
            k = await self.search_k(cfg.training.rounds or DEFAULT_SEARCH_ROUNDS)
            # The search is extra to the budget (the paper's T rounds of search before
            # T of training): a time budget counts from here.
            self.started = time.time()
            if self.elastic is not None:
                self.elastic.store.set(START_KEY, repr(self.started))
        weight, rate = await self.run(cfg.training.rounds, k=k, report=report)
        return await self.finish(weight, time.perf_counter() - start, k, rate)

    @staticmethod
    def job_start(store: Any, now: float | None = None) -> float:
        """When the job started training: the first worker's clock, shared by the store
        (the wall-clock budget counts from it, also for workers that join later).
        compare_set with an empty expected value sets the key only if it is absent."""
        store.compare_set(START_KEY, "", repr(time.time() if now is None else now))
        return float(store.get(START_KEY))

    def reseed(self, store: Any) -> None:
        """A new coordinator (the old one was lost) starts with an empty store: put back
        what this worker knows of the job's counters, so budgets are not counted again
        from zero and a finished job stays finished. Each member does it; the largest
        sample count wins, and the first start written stands (members share one)."""
        self.job_start(store, self.started)
        known = self.pace.consumed  # the count as of its last add; unreported comes later
        while known > 0:
            have = int(store.add(SAMPLES_KEY, 0))
            if have >= known:
                break
            store.compare_set(SAMPLES_KEY, str(have), str(known))
        if self.finished_step is not None:
            store.set(DONE_KEY, str(self.finished_step))

    async def finish(
        self, weight: float, seconds: float, k: int | None = None, rate: float = 0.0
    ) -> Result:
        """Evaluate this worker's model and the weighted average of all models. In a
        user's loop the model holds the average afterwards: it is the job's result."""
        own = self.test_accuracy()
        x = self.local.params()
        while True:
            try:
                x_bar, dist = await weighted_average(x, weight, self.transport)
                break
            except (RuntimeError, TimeoutError):
                if self.elastic is None:
                    raise
                await self.regroup()  # a member left during the final average: again
                x, weight = self.local.params(), 1.0
        self.local.set_params(x_bar)
        avg = self.test_accuracy()
        if self.dataset is not None:
            self.local.set_params(x)
        self.finished_step = self.current_step
        if self.elastic is not None:  # a replacement arriving from now on has nothing to do
            el = self.elastic
            patiently(lambda: el.store.set(DONE_KEY, str(self.current_step)), el, "the job's end")
        tally = self.tally
        return Result(
            self.current_step,
            own,
            avg,
            dist,
            seconds,
            k,
            rate,
            staleness_mean=tally.mean,
            staleness_max=tally.max,
            updates_received=tally.count,
            updates_dropped=tally.dropped,
            metrics=self.reported(),
        )
