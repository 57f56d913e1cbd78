"""Does a slow worker slow the others? gossip vs all-reduce, side by side.

    .venv/bin/python bench/straggler.py [--steps 600] [--out bench/results/straggler.json]

Runs 4 real worker processes (torch.distributed, gloo, 127.0.0.1) per case:
each algorithm once with all workers at full speed and once with worker 0
made 3x slower (DTJ_SIMULATE_SLOWDOWN=3: it sleeps twice its compute time
after each step, like older hardware). Reports the fast workers' mean
samples/s in both runs and the ratio slow/fast-run. Asynchronous methods
(gosgd, dasgd) should keep ~1.0; allreduce drops toward 1/3.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
from pathlib import Path

from dtj_trainer import launcher
from dtj_trainer.config import TrainerConfig

ALGORITHMS = {
    "allreduce": {"lr": 0.1, "momentum": 0.9},
    "gosgd": {"lr": 0.1},
    "dasgd": {"lr": 0.025, "momentum": 0.9},
}


def run(name: str, steps: int, slow: bool) -> dict[str, object]:
    cfg = TrainerConfig.model_validate(
        {
            "job": f"bench-{name}",
            "replicas": 4,
            "algorithm": {"name": name},
            "optimizer": ALGORITHMS[name],
            "training": {"steps": steps, "evalEvery": steps},
        }
    )
    env = {"0": {"DTJ_SIMULATE_SLOWDOWN": "3"}} if slow else None
    result = launcher.run(cfg, out=io.StringIO(), extra_env=env)
    rates = result.worker_samples_per_second
    return {
        "samples_per_second": rates,
        "fast_workers_mean": statistics.mean(rates[1:]),
        "slow_worker": rates[0],
        "averaged_accuracy": result.averaged_accuracy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="bench/results/straggler.json")
    args = parser.parse_args()
    report: dict[str, object] = {
        "machine": platform.processor() or platform.machine(),
        "steps": args.steps,
        "cases": {},
    }
    for name in ALGORITHMS:
        base = run(name, args.steps, slow=False)
        slow = run(name, args.steps, slow=True)
        ratio = float(slow["fast_workers_mean"]) / float(base["fast_workers_mean"])
        report["cases"][name] = {
            "baseline": base,
            "one_worker_3x_slower": slow,  # type: ignore[index]
            "fast_worker_throughput_ratio": ratio,
        }
        print(
            f"{name:>10}: fast workers keep {100 * ratio:5.1f}% of their speed "
            f"when worker 0 is 3x slower",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
