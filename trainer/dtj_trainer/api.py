"""The trainer as a library for the user's own training loop.

    job = dtj_trainer.init()                      # before building the model
    model = build_model()
    opt = job.wrap(model, torch.optim.AdamW(model.parameters(), lr=3e-4))
    for batch in job.batches(train_set):          # this worker's shard, the job's budget
        loss = compute_loss(model, batch)
        loss.backward()
        opt.step()                                # the local step and the job's method
        opt.zero_grad()
        job.report(loss=loss.item())
    job.finish(val_loss=evaluate(model))          # model: the job's averaged result

The job's method (allreduce, dpsgd, gosgd, dasgd, teleportation), its budget,
dynamic batch plan, membership changes, SIGTERM hand-off, warm start and
checkpoints run inside, with the same code as the built-in trainer. Its loop
is a coroutine that this thread runs between the user's batches: each time
the method needs a gradient, the coroutine pauses and hands the model to the
user's code (the next batch of `batches()`), and the wrapped optimizer's
`step()` runs it on to the end of the round. One thread, taking turns: the
user's code sees the model only between the method's phases, and owns the
thread (and its CUDA stream) as in a plain torch loop.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from . import algorithms, data, loader
from .config import TrainerConfig
from .elastic import AlreadyDone, Left
from .entrypoint import Runtime, backend_for, load_runtime
from .loop import Worker
from .metrics import Result
from .session import Session, open_session

__all__ = ["Job", "WrappedOptimizer", "init"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Turns:
    """Whose turn it is: the training loop's coroutine, or the user's code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.paused: asyncio.Future[tuple[str, Any]] | None = None  # why it paused
        self.pause: asyncio.Future[None] | None = None  # what it waits on
        self.owed = False  # the user's step() waits for the end of this round
        self.last: dict[str, float] = {}

    # the training loop's side (algorithms.base.Driver)
    async def compute(self, local: algorithms.Local) -> float:
        await self._hand_over(("compute", local.batch))  # back at the user's step()
        self.owed = True
        return self.last.get("loss", math.nan)

    async def round_over(self) -> None:
        if self.owed:
            self.owed = False
            await self._hand_over(("stepped", None))  # back at the user's next batch

    def reported(self) -> dict[str, float]:
        return dict(self.last)

    async def _hand_over(self, why: tuple[str, Any]) -> None:
        self.pause = self.loop.create_future()
        assert self.paused is not None
        self.paused.set_result(why)
        await self.pause

    # the user's side
    def run(self, task: asyncio.Task[Any]) -> tuple[str, Any]:
        """Run the training loop on until it hands over again, or ends ("done")."""
        paused = self.paused = self.loop.create_future()
        if self.pause is not None:
            self.pause.set_result(None)
            self.pause = None

        def ended(_: object) -> None:
            if not paused.done():
                paused.set_result(("done", None))

        task.add_done_callback(ended)  # cheaper than asyncio.wait on every turn
        self.loop.run_until_complete(paused)
        task.remove_done_callback(ended)
        kind, value = paused.result()
        if kind == "done":
            return "done", task.exception() or task.result()
        return kind, value


class WrappedOptimizer(torch.optim.Optimizer):
    """The user's optimizer, whose `step()` runs this worker's round of the job's method
    (the local step included). Everything else is the user's optimizer's own, so LR
    schedulers, `zero_grad()` and `state_dict()` work as before."""

    def __init__(self, job: Job, inner: torch.optim.Optimizer) -> None:  # no super(): a view
        self._job, self.inner = job, inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise TypeError("the job's optimizer takes no closure: call step() after backward()")
        self._job._stepped()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"WrappedOptimizer({self.inner!r})"


class Job:
    """This worker's view of the job; make one with `init()`."""

    def __init__(self, rt: Runtime, session: Session) -> None:
        self.config: TrainerConfig = rt.config
        self.rank: int = rt.rank  # this worker's slot (its data shard), 0..replicas-1
        self._rt, self._session = rt, session
        self._turns = _Turns()
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._clip: float | None = None
        self._extras: dict[str, Stateful] = {}
        self._worker: Worker | None = None
        self._pending = False  # a batch is out and its step() has not come
        self._wants: tuple[str, Any] | None = None  # the round asked for another batch
        self._outcome: Any = None  # what the training loop ended with
        self._result: Result | None = None
        self._finished = False
        self._task: asyncio.Task[Result] | None = None

    # -- what the user's loop calls --------------------------------------------------

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None = None,
    ) -> WrappedOptimizer:
        """Train `model` with `optimizer` (any torch.optim optimizer over its parameters)
        by the job's method. Build the model after init(): every worker must start
        from the same weights (init() seeds torch with training.seed).
        `clip_grad_norm` clips the gradient the optimizer applies, after the method's
        exchange (allreduce: the averaged one, as clipping after DDP's backward does);
        clipping in the loop before step() clips this worker's own gradient."""
        if self._model is not None:
            raise RuntimeError("wrap() takes the job's one model and optimizer; call it once")
        if self.config.algorithm.name == "teleportation" and not _plain_sgd(optimizer):
            raise ValueError(
                "teleportation moves models between workers without their optimizer state: "
                "use torch.optim.SGD without momentum, or another algorithm"
            )
        self._model, self._optimizer, self._clip = model, optimizer, clip_grad_norm
        return WrappedOptimizer(self, optimizer)

    def track(self, **objects: Stateful) -> None:
        """Objects whose state moves with the worker (warm starts, checkpoints): an LR
        scheduler, a grad scaler, the user's own (state_dict / load_state_dict)."""
        self._extras.update(objects)

    def batches(
        self,
        dataset: Any,
        *,
        collate: Callable[[list[Any]], Any] = default_collate,
        labels: Sequence[int] | None = None,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> Iterator[Any]:
        """Mini-batches of this worker's shard of `dataset` (len() and [i]), as many and
        as large as the job's method, budget and batch plan ask; ends when training is
        over or this worker leaves (SIGTERM: its model has been handed off).

        `labels` (one per sample) let training.dataSplit cut label-skewed shards.
        `evaluate()` scores the model whenever the job reports (every evalEvery
        steps, and before and after the final average); its numbers join the
        report. `test_accuracy` becomes the job's accuracy (status.result), and
        `val_loss` is what teleportation's activeNodes: auto ranks k by.
        `num_workers` and `pin_memory` are torch DataLoader's: the next batches load
        in that many processes while the round runs (loader.py: what was loaded
        ahead and not trained goes back to the job's data, never lost)."""
        if self._model is None or self._optimizer is None:
            raise RuntimeError("call job.wrap(model, optimizer) before job.batches()")
        if self._worker is not None:
            raise RuntimeError("job.batches() runs once per job")
        algorithm = self.config.algorithm
        searches_k = algorithm.name == "teleportation" and algorithm.active_nodes == "auto"
        if searches_k and evaluate is None:
            raise ValueError(
                "teleportation's activeNodes: auto ranks k by validation loss: pass "
                "job.batches(..., evaluate=...) returning val_loss, or set activeNodes"
            )
        if num_workers < 0:
            raise ValueError(f"job.batches(num_workers={num_workers}): 0 or more processes")
        cfg = self.config
        size = len(dataset)
        if size == 0:
            raise ValueError("job.batches() needs a non-empty data set")
        everything = data.Indices(size)  # the sampler picks indices; the data stays put
        elastic = self._session.elastic
        sampler = data.sampler_for(
            cfg,
            everything,
            everything,
            None if labels is None else np.asarray(labels),
            slot=self.rank,
            parts=elastic.shard_parts(cfg.replicas, 1, self.rank),
            reader=elastic.reader,
            shard_sizes=getattr(dataset, "shard_sizes", None),
        )
        feed = None
        if num_workers or pin_memory:
            feed = loader.Loaded(
                dataset, sampler, collate, num_workers=num_workers, pin_memory=pin_memory
            )
        task = self._start(sampler, size, evaluate)
        try:
            yield from self._serve(task, dataset, sampler, collate, feed)
        finally:
            if feed is not None:
                feed.close()

    def _serve(
        self,
        task: asyncio.Task[Any],
        dataset: Any,
        sampler: data.Sampler,
        collate: Callable[[list[Any]], Any],
        feed: loader.Loaded | None,
    ) -> Iterator[Any]:
        assert self._worker is not None
        sampler_owner = self._worker
        while True:
            # The method, up to its next gradient (a timed round may have asked already).
            kind, value = self._wants or self._turns.run(task)
            self._wants = None
            if kind == "done":
                self._outcome = value
                return
            t0 = time.perf_counter()
            local = sampler_owner.local
            if feed is None:
                indices, _ = sampler.next(value)
                batch = collate([dataset[int(i)] for i in indices])
            else:
                batch, local.drawn = feed.next(value)
            local.data_seconds += time.perf_counter() - t0
            self._pending = True
            yield batch
            if self._pending:
                raise RuntimeError(
                    "each batch of job.batches() ends with the wrapped optimizer's step(): "
                    "call opt.step() (the optimizer job.wrap() returned) once per batch"
                )
            if self._outcome is not None:  # training ended during the step
                return

    def report(self, **metrics: float) -> None:
        """This worker's numbers (loss, validation loss, perplexity, ...): progress, the
        job's status and its result; a `loss` is the training loss shown everywhere."""
        self._turns.last.update(_floats(metrics))

    def finish(self, **metrics: float) -> Result | None:
        """After the loop: the job's result (with `metrics`, e.g. the averaged model's
        validation loss), or None when this worker left or arrived after the end. The
        model holds the weighted average of the workers' models from here on."""
        if self._finished:
            return self._result
        if self._outcome is None:
            raise RuntimeError("job.finish() comes after the loop over job.batches() has ended")
        self._finished = True
        outcome = self._outcome
        if isinstance(outcome, Result):  # the loop's numbers, evaluate()'s of the average,
            merged = {**(outcome.metrics or {}), **_floats(metrics)}  # then these
            outcome = replace(outcome, metrics=merged or None)
        result = self._session.conclude(outcome)  # re-raises what broke the training
        self._turns.loop.close()
        gc.collect()  # old generations' process groups go now, not at interpreter exit
        self._result = result
        return result

    # -- what else a loop may read ---------------------------------------------------

    @property
    def step(self) -> int:
        """This worker's step (it goes on from the members' after a warm start)."""
        return self._worker.current_step if self._worker is not None else 0

    @property
    def progress(self) -> float:
        """How much of the job's training is done, 0-1 (its steps, or its budget of
        samples or time): what a learning-rate schedule follows."""
        w = self._worker
        return 0.0 if w is None else w.pace.fraction(w.current_step, time.time() - w.started)

    @property
    def batch_size(self) -> int:
        """This worker's current batch size (the dynamic batch plan moves it)."""
        if self._worker is not None:
            return self._worker.local.batch
        return self.config.batching.per_worker

    # -- the training loop ------------------------------------------------------------

    def _start(
        self,
        sampler: data.Sampler,
        train_size: int,
        evaluate: Callable[[], Mapping[str, float]] | None,
    ) -> asyncio.Task[Result]:
        assert self._model is not None and self._optimizer is not None
        cfg, rt = self.config, self._rt
        local = algorithms.Local(
            self._model,
            self._optimizer,
            sampler,
            cfg.batching.per_worker,
            cfg.optimizer.lr,
            lambda out, y: out,  # unused: the user's code computes the loss
            rt.emulation,
            driver=self._turns,
            extras=dict(self._extras),
            clip_norm=self._clip,
        )
        worker = Worker.for_loop(
            cfg,
            self._session.unconnected(),
            local,
            train_size=train_size,
            slot=self.rank,
            membership=self._session.elastic,
            hint=rt.speed_hint,
            evaluate=None if evaluate is None else lambda: _floats(evaluate()),
        )
        self._worker = worker
        self._session.start(worker)
        self._task = self._turns.loop.create_task(worker.train(self._session.report))
        atexit.register(self._at_exit)
        return self._task

    def _at_exit(self) -> None:
        """A script that ends its loop and forgets finish() still reports its result."""
        if self._outcome is not None and not self._finished:
            self.finish()

    def _stepped(self) -> None:
        """The wrapped optimizer's step(): the method's round goes on with the gradients
        to its end (then the model is the user's again)."""
        if not self._pending:
            raise RuntimeError(
                "opt.step() outside job.batches(): step once for each batch the job hands out"
            )
        self._pending = False
        assert self._task is not None
        kind, value = self._turns.run(self._task)  # the rest of the round
        if kind == "compute":  # a round of several batches (roundSeconds): the next one
            self._wants = (kind, value)
        elif kind == "done":  # training ended (or broke) in this round
            self._outcome = value
            if not isinstance(value, (Result, Left, AlreadyDone)):
                raise value


def _floats(scores: Mapping[str, float]) -> dict[str, float]:
    return {name: float(value) for name, value in scores.items()}


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) is torch.optim.SGD and not any(
        g.get("momentum") for g in optimizer.param_groups
    )


def init(env: Mapping[str, str] | None = None) -> Job:
    """Join the job this process is a worker of: the config the operator (or `dtj
    local`) rendered (DTJ_CONFIG, DTJ_RANK). Without one it trains standalone: one
    worker with the default settings and a coordinator of its own on 127.0.0.1.
    Seeds torch with training.seed, so every worker builds the same initial model."""
    env = os.environ if env is None else env
    sys.setswitchinterval(0.0002)  # the push receiver thread must get in (entrypoint.run)
    if "DTJ_CONFIG" not in env:
        env = _standalone(env)
    rt = load_runtime(env)
    torch.manual_seed(rt.config.training.seed)
    return Job(rt, open_session(rt, backend_for(rt.config.backend)))


def _standalone(env: Mapping[str, str]) -> dict[str, str]:
    """A one-worker job on this machine: its coordinator in this process."""
    import atexit
    import tempfile

    from .coordinator import serve, start_registrar

    store = serve("127.0.0.1", 0)
    cfg = TrainerConfig(job="standalone", replicas=1, store_port=store.port)
    stop = threading.Event()
    atexit.register(start_registrar(cfg, "127.0.0.1", store.port, stop).halt, stop)
    _keep.append(store)
    path = Path(tempfile.mkdtemp(prefix="dtj-standalone-")) / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return {**env, "DTJ_CONFIG": str(path), "DTJ_RANK": "0"}


_keep: list[Any] = []  # the standalone coordinator lives as long as the process
