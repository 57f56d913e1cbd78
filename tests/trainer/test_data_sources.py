"""Data larger than a worker's memory trains with bounded memory (a real process).

A token file four times the worker's memory limit (a cgroup the test creates;
the kernel kills a process that goes over it) is read through
`sources.TokenFile` (a memmap) by a user's script on the data ledger. The
worker reads more of the file than the limit and ends with exit code 0: it
never held the data set, or a shard of it, in memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

from tests.trainer.waiting import wait

pytestmark = pytest.mark.procs

SCRIPT = Path(__file__).parent / "scripts" / "token_file.py"
CGROUPS = Path("/sys/fs/cgroup/memory")  # cgroup v1, as on this project's machines
LIMIT = 700 * 2**20
BLOCK, BATCH, STEPS = 2048, 512, 400  # 2 MiB a step of uint16 tokens: 0.8 GiB read in all


def memory_cgroup(name: str, limit: int) -> Path:
    assert CGROUPS.is_dir(), f"{CGROUPS}: the test needs the cgroup v1 memory controller"
    group = CGROUPS / name
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():
        swap.write_text(str(limit))
    return group


def test_a_token_file_four_times_the_memory_limit_trains_in_it(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.bin"
    count = 4 * LIMIT // 2  # uint16: the file is 4x the limit
    out = np.memmap(tokens, dtype=np.uint16, mode="w+", shape=(count,))
    step = 1 << 24
    for start in range(0, count, step):
        n = min(step, count - start)
        out[start : start + n] = (np.arange(start, start + n) * 2654435761 % 65521).astype(
            np.uint16
        )
    out.flush()
    del out
    group = memory_cgroup(f"dtj-test-{os.getpid()}", LIMIT)
    cfg = TrainerConfig.model_validate(
        {
            "job": "tokens",
            "replicas": 1,
            "algorithm": {"name": "allreduce"},
            "batching": {"perWorker": BATCH},
            "training": {"steps": STEPS, "evalEvery": 50},
        }
    )
    env = {"0": {"TOKENS": str(tokens), "BLOCK": str(BLOCK)}}
    job = LocalJob(cfg, logs=tmp_path, command=[sys.executable, str(SCRIPT)], extra_env=env)
    try:
        job.start_worker(0)
        (group / "cgroup.procs").write_text(str(job.procs[0].pid))  # before torch loads
        wait("the end of training", lambda: not job.running(), timeout=300)
        log = (tmp_path / "worker-0.log").read_text()
        assert job.procs[0].returncode == 0, log[-3000:]
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        read = STEPS * BATCH * (BLOCK + 1) * 2
        print(
            f"token file {tokens.stat().st_size / 2**30:.2f} GiB, memory limit "
            f"{LIMIT / 2**20:.0f} MiB, read {read / 2**30:.2f} GiB, peak use "
            f"{peak / 2**20:.0f} MiB (page cache included)"
        )
        assert tokens.stat().st_size >= 4 * LIMIT and read > LIMIT
        assert job.result() is not None
    finally:
        job.close()
        tokens.unlink()
        for pid in (group / "cgroup.procs").read_text().split():
            (CGROUPS / "cgroup.procs").write_text(pid)
        group.rmdir()
