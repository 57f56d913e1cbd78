"""Synchronous rounds on a noisy shared cluster: jitter, a mid-run slowdown, 6 workers.

    .venv/bin/python bench/noisy_rounds.py

6 real worker processes (allreduce, gloo on 127.0.0.1; 6 is not a power of
two) with modelled compute (2 ms a sample on a speed-1 worker). Two cases:

- constant: speeds 1, 1, 1, 1, 1, 1/2, no noise (as bench/heterogeneity.py);
- noisy: the same, plus each step's compute x (1 + U(-0.3, 0.3)) on every worker
  and worker 0 slowing down 3x a third of the way through the run.

Arms, the same job-wide sample budget each: allreduce (every round waits for
the slowest), allreduce + dynamic batching (batches follow measured speeds,
re-planned every 10 rounds), allreduce with roundSeconds of 10 and of 20 of
the fastest worker's batches (each worker computes until the round's time is
up, its last batch cut to fit; the gradient is weighted by what each computed).
Reported: aggregate samples/s as a ratio to the ideal, the sum of the workers'
modelled throughputs over the run (worker 0's drops to a third after its
slowdown). JSON in bench/results/noisy_rounds.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 0.002
BATCH = 32
SPEEDS = [1, 1, 1, 1, 1, 0.5]
BUDGET = 6 * BATCH * 300  # 300 rounds of a full batch each
JITTER = 0.3
LATER = (3.0, 3.0)  # worker 0: 3x slower after 3 s (about a third of a run)
ROUND_SECONDS = {  # rounds of ten, and of twenty, of the fastest worker's batches
    "timed": 10 * BATCH * SAMPLE_SECONDS,
    "timed-long": 20 * BATCH * SAMPLE_SECONDS,
}


def run(arm: str, noisy: bool) -> dict[str, Any]:
    algorithm: dict[str, Any] = {"name": "allreduce"}
    if arm in ROUND_SECONDS:
        algorithm["roundSeconds"] = ROUND_SECONDS[arm]
    cfg = TrainerConfig.model_validate(
        {
            "job": f"noisy-{arm}",
            "replicas": len(SPEEDS),
            "algorithm": algorithm,
            "batching": {"perWorker": BATCH, "dynamic": arm == "dynamic"},
            "training": {"budget": {"samples": BUDGET}, "evalEvery": 10},
        }
    )
    env: dict[str, dict[str, str]] = {}
    for slot, speed in enumerate(SPEEDS):
        env[str(slot)] = {
            "DTJ_SIMULATE_SAMPLE_SECONDS": str(SAMPLE_SECONDS),
            "DTJ_SIMULATE_SLOWDOWN": str(1 / speed),
            "OMP_NUM_THREADS": "1",
        }
        if noisy:
            env[str(slot)]["DTJ_SIMULATE_JITTER"] = str(JITTER)
    if noisy:
        env["0"]["DTJ_SIMULATE_SLOWDOWN_AFTER"] = f"{LATER[0]}:{LATER[1] / SPEEDS[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        job = LocalJob(cfg, logs=Path(tmp), extra_env=env)
        try:
            for slot in range(len(SPEEDS)):
                job.start_worker(slot)
            while job.running():
                time.sleep(0.2)
            assert not job.failed(), job.failed()
            results = job.results()
            trace = [
                json.loads(line)
                for line in (Path(tmp) / "worker-0.log").read_text().splitlines()
                if line.startswith('{"rank"')
            ]
        finally:
            job.close()
    seconds = max(r.seconds for r in results.values())
    rate = sum(r.samples_per_second for r in results.values())
    ideal = sum(s / SAMPLE_SECONDS for s in SPEEDS)
    if noisy:  # worker 0 at a third of its speed after LATER[0] seconds
        slowed = max(seconds - LATER[0], 0.0) / seconds
        ideal -= SPEEDS[0] / SAMPLE_SECONDS * slowed * (1 - 1 / LATER[1])
    out = {
        "samples_per_second": rate,
        "ideal_samples_per_second": ideal,
        "ratio_to_ideal": rate / ideal,
        "seconds": seconds,
        "steps": {s: r.steps for s, r in results.items()},
    }
    if noisy and arm == "dynamic":
        out["replan_after_slowdown"] = readapted(trace)
    return out


def readapted(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """How fast the plan followed worker 0's slowdown: its batch before (the reports
    of the first LATER[0] seconds), at the end (the last three), and the rounds from
    the slowdown until it is within 20% of the end's."""
    first = trace[0]["time"]
    before = [r["batch"] for r in trace if r["time"] - first < LATER[0] - 0.5]
    after = [r for r in trace if r["time"] - first >= LATER[0]]
    end = sum(r["batch"] for r in trace[-3:]) / 3
    since = next((r["step"] for r in after if r["batch"] <= 1.2 * end), None)
    return {
        "batch_before": before[-1] if before else None,
        "batch_at_end": end,
        "rounds_to_within_20_percent": None if since is None else since - after[0]["step"],
        "round_of_the_slowdown": after[0]["step"] if after else None,
    }


def main() -> int:
    out: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count()}
    for case in ("constant", "noisy"):
        out[case] = {}
        for arm in ("plain", "dynamic", *ROUND_SECONDS):
            r = run(arm, case == "noisy")
            out[case][arm] = r
            print(f"{case:8s} allreduce {arm:10s} {r['ratio_to_ideal']:.3f} of ideal", flush=True)
            if "replan_after_slowdown" in r:
                print(f"  worker 0's batch after its slowdown: {r['replan_after_slowdown']}")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "noisy_rounds.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {results / 'noisy_rounds.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
