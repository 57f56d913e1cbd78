"""The public API's contract on one real process, standalone (no operator, no launcher).

`dtj_trainer.init()` without a rendered config trains alone with a coordinator in
the process and the default settings (300 steps): the loop gets exactly one batch
per step, each of the planned size, from the data set given; `finish()` returns
the result with the numbers reported. Misuse gets an error that says what to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.trainer.waiting import wait

pytestmark = pytest.mark.procs

PRELUDE = """
import json, torch
import dtj_trainer
from torch.utils.data import TensorDataset
job = dtj_trainer.init()
model = torch.nn.Linear(4, 1)
data = TensorDataset(torch.randn(1000, 4), torch.randn(1000, 1))
opt = job.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
"""


def run(body: str) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )


def test_standalone_the_loop_gets_one_planned_batch_per_step_and_finish_returns_the_result():
    done = run(
        """
        sizes, steps = [], []
        for x, y in job.batches(data):
            sizes.append(len(x)); steps.append(job.step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            job.report(loss=loss.item())
        result = job.finish(final=1.5)
        print("OUT", json.dumps({"sizes": sorted(set(sizes)), "n": len(sizes), "steps": steps[:3],
              "step": job.step, "result_steps": result.steps, "metrics": result.metrics}))
        """
    )
    assert done.returncode == 0, done.stderr
    out = next(line for line in done.stdout.splitlines() if line.startswith("OUT "))
    got = json.loads(out[4:])
    assert got["n"] == 300 and got["step"] == 300 and got["result_steps"] == 300
    assert got["sizes"] == [32]  # batching.perWorker's default
    assert got["steps"] == [0, 1, 2]  # job.step: the rounds done before this batch
    assert got["metrics"]["final"] == 1.5 and "loss" in got["metrics"]


def test_a_batch_without_a_step_is_an_error_that_says_to_call_step():
    done = run(
        """
        for x, y in job.batches(data):
            torch.nn.functional.mse_loss(model(x), y).backward()
        """
    )
    assert done.returncode != 0
    assert "call opt.step() (the optimizer job.wrap() returned) once per batch" in done.stderr


def test_evaluate_scores_the_model_at_every_report_and_at_the_end_and_fills_the_accuracy():
    """`evaluate=`: called at each report (evalEvery) and before and after the final
    average; its test_accuracy becomes the progress's and the result's accuracy, its
    other numbers join the reported ones."""
    done = run(
        """
        calls = []
        def evaluate():
            calls.append(job.step)
            return {"test_accuracy": 0.25, "probe": float(len(calls))}
        for x, y in job.batches(data, evaluate=evaluate):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step(); opt.zero_grad()
        result = job.finish()
        print("OUT", json.dumps({"calls": calls, "own": result.worker_accuracy,
              "avg": result.averaged_accuracy, "metrics": result.metrics}))
        """
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"rank"')]
    got = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("OUT "))[4:])
    every = 50  # training.evalEvery's default; standalone runs 300 steps
    assert [p["step"] for p in lines] == list(range(every, 301, every))
    assert all(p["test_accuracy"] == 0.25 and "test_accuracy" not in p["metrics"] for p in lines)
    assert [p["metrics"]["probe"] for p in lines] == [float(i) for i in range(1, 7)]
    assert got["calls"] == [*range(every, 301, every), 300, 300]  # + before and after averaging
    assert got["own"] == got["avg"] == 0.25 and got["metrics"] == {"probe": 8.0}


REGRESSION = """
import os
import torch
import dtj_trainer
from torch.utils.data import TensorDataset

job = dtj_trainer.init()
model = torch.nn.Linear(8, 1)
g = torch.Generator().manual_seed(1)
x = torch.randn(2000, 8, generator=g)
data = TensorDataset(x, x @ torch.arange(1.0, 9.0).unsqueeze(1))
def mse():
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]))
start = mse()
if job.config.algorithm.name == "teleportation":  # moves models without optimizer state
    inner = torch.optim.SGD(model.parameters(), lr=0.02)
else:
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
opt = job.wrap(model, inner)
batches = 0
for xb, yb in job.batches(data):
    torch.nn.functional.mse_loss(model(xb), yb).backward()
    opt.step()
    opt.zero_grad()
    batches += 1
local = {k: float(os.environ[k]) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
job.finish(start=start, end=mse(), batches=batches, **local)
"""


@pytest.mark.parametrize(
    "method", ["allreduce", "allreduce-timed", "dpsgd", "gosgd", "dasgd", "teleportation"]
)
def test_every_method_trains_a_users_loop_on_real_processes(tmp_path, method):
    """... and with roundSeconds a round is as many of the loop's batches as fit in it
    (slot 0, 3x slower, fits fewer), each ended by its opt.step()."""
    from dtj_trainer.config import TrainerConfig
    from dtj_trainer.launcher import LocalJob

    script = tmp_path / "train.py"
    script.write_text(REGRESSION)
    algorithm: dict[str, object] = {"name": method.split("-")[0]}
    env: dict[str, dict[str, str]] = {}
    if method == "teleportation":
        algorithm["activeNodes"] = 2
    if method == "allreduce-timed":
        algorithm["roundSeconds"] = 0.05
        for slot in range(3):
            env[str(slot)] = {"DTJ_SIMULATE_SAMPLE_SECONDS": "0.0002"}
        env["0"]["DTJ_SIMULATE_SLOWDOWN"] = "3"
    cfg = TrainerConfig.model_validate(
        {
            "job": f"user-{method}",
            "replicas": 3,
            "algorithm": algorithm,
            "training": {"steps": 150, "evalEvery": 50},
            "timeoutSeconds": 20,
        }
    )
    job = LocalJob(
        cfg, logs=tmp_path / "logs", command=[sys.executable, str(script)], extra_env=env
    )
    try:
        for slot in range(3):
            job.start_worker(slot)
        wait("the end of training", lambda: not job.running(), timeout=180)
        assert not job.failed(), (tmp_path / "logs" / "worker-0.log").read_text()[-3000:]
        results = job.results()
    finally:
        job.close()
    assert sorted(results) == [0, 1, 2]
    for slot, r in results.items():  # torchrun's names, as dtj local sets them
        assert (r.metrics["LOCAL_RANK"], r.metrics["LOCAL_WORLD_SIZE"]) == (slot, 3)
    for r in results.values():
        assert r.steps == 150 and r.metrics
        # the averaged model (what finish() reports on) fits far better than x0
        assert r.metrics["end"] < 0.1 * r.metrics["start"], r.metrics
    batches = [results[slot].metrics["batches"] for slot in range(3)]
    if method == "allreduce-timed":
        assert 150 <= batches[0] < min(batches[1:]), batches  # >= 1 a round, by speed
    elif method == "teleportation":  # the 2 active workers of each round compute
        assert sum(batches) == 2 * 150 and max(batches) <= 150, batches
    else:
        assert batches == [150, 150, 150], batches
