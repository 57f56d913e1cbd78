"""The worker's training loop: it reads like a story, whatever the method.

    build (same seed everywhere) -> algorithm.setup -> for each step:
    algorithm.round, report -> algorithm.finish -> weighted average, evaluate.

It is a coroutine so that the same code runs as a real process
(DistTransport) and as one of many virtual workers in the simulator. Who it
trains with is its `Membership` (members.py): a fixed world, or the elastic
generations of a real job (elastic.py), where workers leave and join between
rounds and a failed collective leads to a new generation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import algorithms, checkpoint, data, ksearch, objective, task
from .algorithms import weighted_average
from .balancer import Balancer, gradient_scales
from .config import ASYNC_ALGORITHMS, TrainerConfig
from .emulation import Emulation
from .members import Fixed, Membership
from .metrics import Progress, Result, StalenessTally
from .pace import Pace
from .transport import Transport

Reporter = Callable[[Progress], "bool | None"]  # True: end the run after this round
DEFAULT_SEARCH_ROUNDS = 300  # teleportation's k search under a budget


@dataclass
class Worker:
    """One worker's model, data and optimizer, built identically on every rank."""

    cfg: TrainerConfig
    transport: Transport
    local: algorithms.Local
    x0: torch.Tensor
    # The model's scores at each report and at the end ("test_accuracy" fills the
    # job's accuracy; "val_loss" ranks teleportation's k candidates).
    evaluate: task.Scores | None = None
    algo: algorithms.Algorithm | None = None
    current_step: int = 0
    membership: Membership = field(default_factory=Fixed)
    slot: int = 0
    k: int | None = None  # teleportation's k for this run
    pace: Pace = field(default_factory=lambda: Pace(rounds=None))
    balancer: Balancer | None = None  # batching.dynamic
    hint: float = 1.0  # this worker's speed hint (its node pool's speed)
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
        membership: Membership | None = None,
        hint: float = 1.0,
        emulation: Emulation | None = None,
    ) -> Worker:
        """The built-in task's worker in the simulator (real processes run it as a
        script on the public API: builtin.py). `slot` picks the data shard; it is
        the rank in a fixed run. `emulation`: modelled hardware."""
        emulation = emulation or Emulation()
        if transport.virtual_time:  # the simulator's asynchronous mode: slowness is a
            emulation = replace(emulation, slowdown=1.0)  # clock tick, not a sleep
        slot = transport.rank if slot is None else slot
        spec = task.load(cfg)
        x_train, y_train = spec.train
        membership = membership or Fixed()
        sampler = data.sampler_for(
            cfg,
            x_train,
            y_train,
            y_train.numpy(),
            slot=slot,
            parts=membership.shard_parts(cfg.replicas, transport.size, slot),
            reader=membership.reader,
        )
        model = spec.model()
        opt = objective.build_optimizer(cfg.optimizer, model.parameters())
        local = algorithms.Local(
            model,
            opt,
            sampler,
            cfg.batching.per_worker,
            cfg.optimizer.lr,
            spec.loss_fn,
            emulation,
            precision=cfg.training.precision,
            clip_norm=cfg.optimizer.grad_clip_norm,
        )
        balancer = Balancer(cfg.batching) if cfg.batching.dynamic else None
        return cls(
            cfg,
            transport,
            local,
            algorithms.flat_params(model),
            spec.scores(model),
            membership=membership,
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
        membership: Membership,
        hint: float = 1.0,
        evaluate: task.Scores | None = None,
    ) -> Worker:
        """A worker whose gradients the user's own loop computes (`local.driver`), with
        the user's model and optimizer in `local` and the user's `evaluate`."""
        return cls(
            cfg,
            transport,
            local,
            algorithms.flat_params(local.model),
            evaluate,
            membership=membership,
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
        self.local.sampler.reseed(now=True)  # a new coordinator: its ledger from our copies
        self.local.load_extras(state)
        self.current_step = int(state["step"])
        self.pace.consumed = int(state["samples"])
        self.k = state.get("k")
        self.say(
            f"resumed from the checkpoint at step {self.current_step} "
            f"({self.pace.consumed} samples trained by the job)"
        )

    def say(self, message: str) -> None:
        self.membership.say(message)

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

        Between rounds the membership may move the worker to a new generation (or
        hand its model off and leave: SIGTERM); a failed round is the membership's to
        recover from (a new generation, the same step) or to raise.
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
            if (regrouped := await self.membership.between_rounds(self)) is not None:
                algo = regrouped
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
                self.local.sampler.rollback()  # its samples come again
                algo = await self.membership.recover(self, e, f"round {step}")
                continue
            self.local.sampler.commit()
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
                generation, members = self.membership.roster(t.size)
                scores = self.scores()
                enough = report(
                    Progress(
                        rank=self.slot,
                        step=done,
                        loss=sum(losses) / len(losses) if losses else float("nan"),
                        samples_per_second=window_samples / max(now - window_start, 1e-9),
                        test_accuracy=scores.pop("test_accuracy", None),
                        metrics={**(self.reported() or {}), **scores} or None,
                        bytes_sent=t.counters.bytes_sent,
                        bytes_received=t.counters.bytes_received,
                        comm_wait_seconds=t.counters.wait_seconds,
                        data_wait_seconds=self.local.data_seconds,
                        epoch=self.local.sampler.epoch,
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
                        generation=generation,
                        members=members,
                    )
                )
                window_start, window_samples, losses, staleness, stale = now, 0, [], [], []
                if enough:  # the reporter has seen what it needed (a benchmark)
                    break
        await self.local.round_over()
        rate = run_samples / max(time.perf_counter() - run_start, 1e-9)
        if cfg.algorithm.name in ASYNC_ALGORITHMS and pace.unreported:
            # The last rounds count too: the job's count is what was trained.
            pace.consumed = self.membership.count_samples(self, pace.unreported)
            pace.unreported = 0
        while True:
            try:
                weight = await self.algo.finish(self.local)
                return weight, rate
            except (RuntimeError, TimeoutError) as e:
                await self.membership.recover(self, e, "the method's last exchange")

    def scores(self) -> dict[str, float]:
        """This model's scores now (what `evaluate` says; nothing without one)."""
        return {} if self.evaluate is None else dict(self.evaluate())

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
            total = self.membership.count_samples(self, pace.unreported)
            pace.unreported = 0
            pace.consumed = total
            pace.last_check, pace.next_check = step, step + pace.every
            speeds = self.membership.speeds(self, speed) if self.balancer is not None else None
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

    def model_weight(self) -> float:
        """This model's weight in a state sync: what the method says it holds (GoSGD's
        sum-weight, teleportation's 0 for an idle worker, else 1); 0 before the first
        step (a joiner brings nothing yet)."""
        if self.current_step == 0 or self.algo is None:
            return 0.0
        return self.algo.state_weight()

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

    async def train(self, report: Reporter | None = None) -> Result:
        cfg = self.cfg
        self.resume()
        await self.membership.begin(self)
        start = time.perf_counter()
        k = self.k  # resumed
        auto = cfg.algorithm.name == "teleportation" and cfg.algorithm.active_nodes == "auto"
        if auto and k is None:
            k = await ksearch.search_k(self, cfg.training.rounds or DEFAULT_SEARCH_ROUNDS)
            # The search is extra to the budget (the paper's T rounds of search before
            # T of training): a time budget counts from here.
            self.started = time.time()
            self.membership.search_over(self.started)
        weight, rate = await self.run(cfg.training.rounds, k=k, report=report)
        return await self.finish(weight, time.perf_counter() - start, k, rate)

    async def finish(
        self, weight: float, seconds: float, k: int | None = None, rate: float = 0.0
    ) -> Result:
        """Evaluate this worker's model and the weighted average of all models (their
        parameters and floating-point buffers: BatchNorm's statistics are averaged with
        the weights they were measured with). In a user's loop the model holds the
        average afterwards: it is the job's result."""
        own = self.scores().get("test_accuracy")
        x = self.local.state_vector()
        while True:
            try:
                x_bar, dist = await weighted_average(x, weight, self.transport)
                break
            except (RuntimeError, TimeoutError) as e:  # a member left: again, in the new
                await self.membership.recover(self, e, "the final average")  # generation
                x, weight = self.local.state_vector(), 1.0
        self.local.set_state_vector(x_bar)
        averaged = self.scores()
        avg = averaged.pop("test_accuracy", None)
        if self.local.driver is None:  # the simulator's workers keep their own models
            self.local.set_state_vector(x)
        self.finished_step = self.current_step
        self.membership.ended(self.current_step)  # a replacement arriving now has nothing to do
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
            metrics={**(self.reported() or {}), **averaged} or None,
        )
