"""Run a job's workers as local processes: the embedded default (`dtj local`).

The launcher plays the cluster's part on one machine: it hosts the
coordinator (store and membership registrar) on 127.0.0.1, starts one
`python -m dtj_trainer` per slot with the same environment contract the
operator renders into pods, shows progress read from the store, and prints
the result. `LocalJob` also lets tests and benchmarks stop workers (SIGTERM,
SIGKILL) and add new ones while the job trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import membership
from .config import TrainerConfig
from .metrics import Progress, Result


@dataclass(frozen=True)
class LocalResult:
    averaged_accuracy: float | None  # None for a user's loop: see metrics
    worker_accuracies: list[float]
    consensus_distance: float
    wall_seconds: float
    worker_samples_per_second: list[float]
    metrics: dict[str, float] | None = None  # a user's loop: the workers' mean of job.report()


def _read(store: Any, key: str) -> dict[str, Any] | None:
    if not store.check([key]):
        return None
    record: dict[str, Any] = json.loads(store.get(key))
    return record


def progress_line(cfg: TrainerConfig, reports: list[Progress]) -> str:
    """One line summarising the workers' latest reports."""
    loss = sum(r.loss for r in reports) / len(reports)
    rate = sum(r.samples_per_second for r in reports)
    accs = [r.test_accuracy for r in reports if r.test_accuracy is not None]
    step = min(r.step for r in reports)
    rounds, budget = cfg.training.rounds, cfg.training.budget
    if rounds is not None:
        where = f"step {step:>5}/{rounds} ({100 * step / rounds:3.0f}%)"
    else:
        done = max((r.job_samples or 0) for r in reports)
        where = f"{done:>7,} samples" + (
            f" ({100 * done / budget.samples:3.0f}%)" if budget and budget.samples else ""
        )
    batches = [r.batch for r in sorted(reports, key=lambda r: r.rank) if r.batch is not None]
    plan = f"  batches {'/'.join(map(str, batches))}" if cfg.batching.dynamic else ""
    if accs:
        quality = f"test acc {100 * min(accs):.1f}-{100 * max(accs):.1f}%"
    else:  # a user's loop: what it reports besides the loss
        quality = "  ".join(
            f"{name} {value:.4g}"
            for name, value in mean_metrics([r.metrics for r in reports]).items()
            if name != "loss"
        )
    return f"{where}  loss {loss:.3f}  {quality}  {rate:,.0f} samples/s{plan}"


def mean_metrics(reported: list[dict[str, float] | None]) -> dict[str, float]:
    """The mean of each reported number over the workers that reported it."""
    names = sorted({name for m in reported for name in m or {}})
    return {
        name: sum(vs) / len(vs)
        for name in names
        if (vs := [m[name] for m in reported if m and name in m])
    }


class LocalJob:
    """A job's coordinator and worker processes on this machine."""

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        extra_env: dict[str, dict[str, str]] | None = None,
        logs: Path | None = None,
        command: list[str] | None = None,
        working_dir: Path | None = None,
    ) -> None:
        """`command`: what each worker runs (a user's training script), by default the
        built-in trainer; `working_dir` is where it runs (default: here)."""
        from .coordinator import serve  # imports torch

        self.store = serve("127.0.0.1", 0)
        self.cfg = cfg.model_copy(update={"store_host": "127.0.0.1", "store_port": self.store.port})
        self.extra_env = extra_env or {}
        self._tmp = tempfile.TemporaryDirectory(prefix="dtj-local-")
        self.dir = Path(self._tmp.name)
        self.logs = logs
        self.command = command or [sys.executable, "-m", "dtj_trainer"]
        self.working_dir = working_dir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stop = threading.Event()
        from .coordinator import start_registrar

        self.authority = start_registrar(self.cfg, "127.0.0.1", self.store.port, self.stop)
        self.registrar = self.authority.registrar
        self.registrar.log = lambda _: None
        self.start_time = time.perf_counter()

    def start_worker(self, slot: int, *, replicas: int | None = None) -> None:
        """Start the worker of `slot` (a replacement, or a new slot when scaling up)."""
        cfg = self.cfg
        if replicas is not None:
            cfg = cfg.model_copy(update={"replicas": replicas})
        path = self.dir / f"config-{cfg.replicas}.json"
        path.write_text(cfg.model_dump_json(by_alias=True))
        env = {
            **os.environ,
            "DTJ_CONFIG": str(path),
            "DTJ_RANK": str(slot),
            # torchrun's names: this machine runs every worker (a GPU script's device)
            "LOCAL_RANK": str(slot),
            "LOCAL_WORLD_SIZE": str(cfg.replicas),
            # One core per worker keeps n workers on a small machine from thrashing.
            "OMP_NUM_THREADS": "1",
            **self.extra_env.get(str(slot), {}),
        }
        out: Any = subprocess.DEVNULL
        if self.logs is not None:
            self.logs.mkdir(parents=True, exist_ok=True)
            out = open(self.logs / f"worker-{slot}.log", "ab")  # noqa: SIM115 - the child's
        self.procs[slot] = subprocess.Popen(
            self.command,
            env=env,
            cwd=self.working_dir,
            stdout=out,
            stderr=subprocess.STDOUT if self.logs is not None else None,
            start_new_session=True,
        )

    def signal(self, slot: int, sig: int) -> None:
        os.killpg(self.procs[slot].pid, sig)

    def generation(self) -> membership.Generation | None:
        return membership.read_current(self.store)

    def reports(self) -> dict[int, Progress]:
        raw = {s: _read(self.store, f"progress/{s}") for s in self.procs}
        return {s: Progress(**r) for s, r in raw.items() if r is not None}

    def failed(self) -> list[tuple[int, int]]:
        return [(s, p.returncode) for s, p in self.procs.items() if p.returncode]

    def results(self) -> dict[int, Result]:
        raw = {s: _read(self.store, f"result/{s}") for s in self.procs}
        return {s: Result(**r) for s, r in raw.items() if r is not None}

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs.values():
            p.wait()
        self.authority.halt(self.stop)
        self._tmp.cleanup()

    def result(self) -> LocalResult:
        results = list(self.results().values())
        if not results:
            raise RuntimeError("no worker reported a result")
        return LocalResult(
            averaged_accuracy=results[0].averaged_accuracy,
            worker_accuracies=[r.worker_accuracy for r in results if r.worker_accuracy is not None],
            consensus_distance=results[0].consensus_distance,
            wall_seconds=time.perf_counter() - self.start_time,
            worker_samples_per_second=[r.samples_per_second for r in results],
            metrics=mean_metrics([r.metrics for r in results]) or None,
        )


def pace_text(cfg: TrainerConfig) -> str:
    budget = cfg.training.budget
    if budget is None:
        return f"{cfg.training.rounds} steps per worker"
    parts = [f"{budget.samples:,} samples" if budget.samples else ""]
    parts.append(f"{budget.epochs:g} epochs" if budget.epochs else "")
    parts.append(f"at most {budget.seconds:g}s" if budget.seconds else "")
    return "budget " + ", ".join(p for p in parts if p)


def run(
    cfg: TrainerConfig,
    *,
    out: TextIO = sys.stdout,
    extra_env: dict[str, dict[str, str]] | None = None,
    poll_seconds: float = 0.2,
    command: list[str] | None = None,
    working_dir: Path | None = None,
) -> LocalResult:
    """Train `cfg` with cfg.replicas local processes running `command` (default: the
    built-in trainer); raise if a worker fails."""
    job = LocalJob(cfg, extra_env=extra_env, command=command, working_dir=working_dir)
    cfg = job.cfg
    try:
        for slot in range(cfg.replicas):
            job.start_worker(slot)
        print(
            f"started {cfg.replicas} workers: {cfg.algorithm.name}"
            + (f" on a {cfg.algorithm.topology}" if cfg.algorithm.name == "dpsgd" else "")
            + f", {pace_text(cfg)}, store 127.0.0.1:{cfg.store_port}",
            file=out,
            flush=True,
        )
        last_step = 0

        def show_progress() -> None:
            nonlocal last_step
            ready = list(job.reports().values())
            if len(ready) == cfg.replicas and min(r.step for r in ready) > last_step:
                last_step = min(r.step for r in ready)
                print(progress_line(cfg, ready), file=out, flush=True)

        while job.running():
            if failed := job.failed():
                slot, code = failed[0]
                raise RuntimeError(
                    f"worker {slot} exited with code {code}; its error is printed above"
                )
            show_progress()
            time.sleep(poll_seconds)
        show_progress()  # the last report may land after the previous poll
        if failed := job.failed():
            slot, code = failed[0]
            raise RuntimeError(f"worker {slot} exited with code {code}; see its error above")
        if len(job.results()) < cfg.replicas:
            raise RuntimeError("a worker exited without reporting a result")
        return job.result()
    finally:
        job.close()
