"""Run a job's workers as local processes: the embedded default (`dtj local`).

The launcher plays the cluster's part on one machine: it hosts the
coordinator store on 127.0.0.1, starts one `python -m dtj_trainer` per slot
with the same environment contract the operator renders into pods, shows
progress read from the store, and prints the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .config import TrainerConfig
from .metrics import Progress, Result


@dataclass(frozen=True)
class LocalResult:
    averaged_accuracy: float
    worker_accuracies: list[float]
    consensus_distance: float
    wall_seconds: float
    worker_samples_per_second: list[float]


def _read(store: Any, key: str) -> dict[str, Any] | None:
    if not store.check([key]):
        return None
    record: dict[str, Any] = json.loads(store.get(key))
    return record


def progress_line(cfg: TrainerConfig, reports: list[Progress]) -> str:
    """One line summarising the workers' latest reports."""
    loss = sum(r.loss for r in reports) / len(reports)
    rate = sum(r.samples_per_second for r in reports)
    accs = [r.test_accuracy or 0.0 for r in reports]
    step = min(r.step for r in reports)
    pct = 100 * step / cfg.training.steps
    return (
        f"step {step:>5}/{cfg.training.steps} ({pct:3.0f}%)  loss {loss:.3f}  "
        f"test acc {100 * min(accs):.1f}-{100 * max(accs):.1f}%  {rate:,.0f} samples/s"
    )


def run(
    cfg: TrainerConfig,
    *,
    out: TextIO = sys.stdout,
    extra_env: dict[str, dict[str, str]] | None = None,
    poll_seconds: float = 0.2,
) -> LocalResult:
    """Train `cfg` with cfg.replicas local processes; raise if a worker fails."""
    from .coordinator import serve  # imports torch

    store = serve("127.0.0.1", 0)
    cfg = cfg.model_copy(update={"store_host": "127.0.0.1", "store_port": store.port})
    n = cfg.replicas
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtj-local-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(cfg.model_dump_json(by_alias=True))
        procs = []
        for rank in range(n):
            env = {
                **os.environ,
                "DTJ_CONFIG": str(path),
                "DTJ_RANK": str(rank),
                # One core per worker keeps n workers on a small machine from thrashing.
                "OMP_NUM_THREADS": "1",
                **(extra_env or {}).get(str(rank), {}),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dtj_trainer"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        print(
            f"started {n} workers: {cfg.algorithm.name}"
            + (f" on a {cfg.algorithm.topology}" if cfg.algorithm.name == "dpsgd" else "")
            + f", {cfg.training.steps} steps, store 127.0.0.1:{store.port}",
            file=out,
            flush=True,
        )
        try:
            last_step = 0
            while any(p.poll() is None for p in procs):
                failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode]
                if failed:
                    rank, code = failed[0]
                    raise RuntimeError(
                        f"worker {rank} exited with code {code}; its error is printed above"
                    )
                raw = [_read(store, f"progress/{r}") for r in range(n)]
                ready = [Progress(**r) for r in raw if r is not None]
                if len(ready) == n and min(r.step for r in ready) > last_step:
                    last_step = min(r.step for r in ready)
                    print(progress_line(cfg, ready), file=out, flush=True)
                time.sleep(poll_seconds)
            failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode]
            if failed:
                rank, code = failed[0]
                raise RuntimeError(f"worker {rank} exited with code {code}; see its error above")
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait()
    raw = [_read(store, f"result/{r}") for r in range(n)]
    if any(r is None for r in raw):
        raise RuntimeError("a worker exited without reporting a result")
    results = [Result(**r) for r in raw if r is not None]
    return LocalResult(
        averaged_accuracy=results[0].averaged_accuracy,
        worker_accuracies=[r.worker_accuracy for r in results],
        consensus_distance=results[0].consensus_distance,
        wall_seconds=time.perf_counter() - start,
        worker_samples_per_second=[r.samples_per_second for r in results],
    )
