"""A coordinator away for longer than timeoutSeconds: the workers wait for it and finish.

Real processes: the coordinator (`python -m dtj_trainer.coordinator`) and two
asynchronous workers on a job-wide sample budget. The coordinator is SIGKILLed
mid-run and a new one starts on the same address only after 2.5 x
timeoutSeconds (issue 18, finding 8: a regroup did not catch the TimeoutError
and every worker exited 1). The workers keep their processes, register with
the new coordinator, give it back the job's sample count (finding 6) and end
with exit code 0, having trained the budget once, not twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.transport import connect_store

pytestmark = pytest.mark.procs

TIMEOUT = 4.0
BUDGET = 2 * 32 * 400  # 400 rounds a worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_workers_wait_out_a_long_coordinator_outage_and_finish(tmp_path: Path) -> None:
    port = free_port()
    cfg = TrainerConfig.model_validate(
        {
            "job": "outage",
            "replicas": 2,
            "algorithm": {"name": "gosgd"},
            "optimizer": {"lr": 0.1},
            "training": {"budget": {"samples": BUDGET}, "evalEvery": 20},
            "storeHost": "127.0.0.1",
            "storePort": port,
            "timeoutSeconds": TIMEOUT,
        }
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    env = {**os.environ, "DTJ_CONFIG": str(path), "OMP_NUM_THREADS": "1"}
    # ~48 ms a round of modelled compute: the run lasts ~20 s, the outage ~10 s of it.
    env["DTJ_SIMULATE_SAMPLE_SECONDS"] = "0.0015"

    def coordinator(n: int) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"coordinator-{n}.log", "wb")  # noqa: SIM115 - the child's
        cmd = [sys.executable, "-m", "dtj_trainer.coordinator", "--host=127.0.0.1"]
        return subprocess.Popen([*cmd, f"--port={port}"], env=env, stdout=log, stderr=log)

    first = coordinator(1)
    workers = []
    try:
        time.sleep(2)  # listening
        for rank in range(2):
            log = open(tmp_path / f"worker-{rank}.log", "wb")  # noqa: SIM115 - the child's
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dtj_trainer"],
                    env={**env, "DTJ_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 120
        while "generation 0:" not in (tmp_path / "worker-0.log").read_text():
            assert time.monotonic() < deadline, "the workers never started training"
            time.sleep(0.2)
        time.sleep(4)  # training, about a fifth of the budget
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(2.5 * TIMEOUT)  # longer than any collective or store timeout
        second = coordinator(2)
        try:
            codes = [w.wait(timeout=240) for w in workers]
            logs = [(tmp_path / f"worker-{r}.log").read_text() for r in range(2)]
            assert codes == [0, 0], logs
            # Each noticed the outage (when it next needed the store: a round that failed
            # while the coordinator was away, or a regroup that had to wait for it).
            noticed = ("interrupted", "the coordinator may be restarting")
            assert all(any(n in log for n in noticed) for log in logs), logs
            # In a generation of the new coordinator (numbered after the old one's 0; it
            # may admit one worker first, so the other's first is generation 2).
            assert all(re.search(r"generation [1-9]\d*: rank", log) for log in logs), logs
            store = connect_store("127.0.0.1", port, timeout=10)
            results = [json.loads(store.get(f"result/{r}")) for r in range(2)]
            rounds = sum(r["steps"] for r in results)
            # Counted once: ~800 rounds in all (a count restarted at 0 would allow ~1,600).
            assert rounds * 32 <= 1.2 * BUDGET, results
        finally:
            second.kill()
    finally:
        for p in [first, *workers]:
            if p.poll() is None:
                p.kill()


def test_a_worker_started_before_its_coordinator_waits_for_it(tmp_path: Path) -> None:
    """A worker may start while its coordinator is being replaced, or before it listens
    (pods start in any order): it says so and waits, as running workers do, instead of
    exiting 1 on its first connection (seen with a replacement worker starting while the
    coordinator was replaced)."""
    port = free_port()
    cfg = TrainerConfig.model_validate(
        {
            "job": "early",
            "replicas": 1,
            "algorithm": {"name": "allreduce"},
            "training": {"steps": 30, "evalEvery": 10},
            "storeHost": "127.0.0.1",
            "storePort": port,
            "timeoutSeconds": 2,
        }
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    env = {**os.environ, "DTJ_CONFIG": str(path), "OMP_NUM_THREADS": "1", "DTJ_RANK": "0"}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dtj_trainer"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    coordinator = None
    try:
        deadline = time.monotonic() + 60
        while "does not answer yet" not in log.read_text():
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # longer than timeoutSeconds: one connection attempt would have failed
        cmd = [sys.executable, "-m", "dtj_trainer.coordinator", "--host=127.0.0.1"]
        coordinator = subprocess.Popen([*cmd, f"--port={port}"], env=env)
        assert worker.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        for p in (worker, coordinator):
            if p is not None and p.poll() is None:
                p.kill()
    assert '"steps": 30' in log.read_text()
