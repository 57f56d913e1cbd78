"""Do fast workers wait for a slow one? Every method, one budget, side by side.

    .venv/bin/python bench/heterogeneity.py            # quick: 1 seed, sweeps at the tuned lr
    .venv/bin/python bench/heterogeneity.py --seeds 3  # 3 seeds at factor 3, sweeps 1
    .venv/bin/python bench/heterogeneity.py --full     # 3 seeds everywhere

4 real worker processes per run (torch.distributed, gloo, 127.0.0.1), one of
them with 3x slower modelled compute (DTJ_SIMULATE_SAMPLE_SECONDS x
DTJ_SIMULATE_SLOWDOWN: compute is slept before the worker communicates, so
communication is small next to compute, as on GPUs, and a "3x slower worker"
is 3x the compute, not 3x the waiting). Every method trains the same model on
the same data for the same job-wide sample budget (training.budget.samples;
DDP runs budget / (4 x batch) rounds), the learning rate picked per method
from a small grid. Methods: torch DDP (what users run today), allreduce,
allreduce + dynamic batching, dpsgd, dpsgd + dynamic batching, gosgd, dasgd.

Reported per method (median and spread over seeds): aggregate samples/s as a
ratio to the ideal (the sum of each worker's solo throughput, measured),
training wall time, and time to the target test accuracy as a ratio to DDP's.
Then the slow worker's factor swept over 1, 2, 3, 5, and a 5-worker case with
speeds 1, 1, 1, 1/2, 1/4. JSON and PNG in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 0.002  # modelled compute: 64 ms for a batch of 32 on a "fast" worker
BATCH = 32
TARGET = 0.93  # test accuracy on digits (the learning rates are picked by time to it)
LATE_TARGET = 0.95  # nearer convergence: less start-up, more training in the comparison
EVAL_EVERY = 5
ROUNDS = 150  # budget = ROUNDS x BATCH x workers samples
# dpsgd's graph: one peer per round, the peer at distance 2^(t mod log2 n); with n a
# power of two its rounds average exactly every log2 n steps (Ying et al. 2021) while
# sending half a ring's bytes. The ring arm shows what the default graph costs.
EXPONENTIAL = "one-peer-exponential"
# Learning rates: the centre of each method's grid (x 0.5, 1, 2 are tried).
METHODS: dict[str, dict[str, Any]] = {
    "ddp": {"lr": 0.2, "momentum": 0.9},
    "allreduce": {"lr": 0.2, "momentum": 0.9},
    "allreduce+balancer": {"lr": 0.2, "momentum": 0.9, "dynamic": True},
    "dpsgd": {"lr": 0.2, "momentum": 0.9, "topology": EXPONENTIAL},
    "dpsgd+balancer": {"lr": 0.2, "momentum": 0.9, "dynamic": True, "topology": EXPONENTIAL},
    "dpsgd+balancer/ring": {"lr": 0.2, "momentum": 0.9, "dynamic": True, "topology": "ring"},
    "gosgd": {"lr": 0.2, "momentum": 0.0},
    "dasgd": {"lr": 0.2, "momentum": 0.9},  # every applied gradient is scaled by 1/n
}
GRID = (0.5, 1.0, 2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_target(
    records: list[dict[str, Any]], start: float, workers: int, target: float = TARGET
) -> float | None:
    """Seconds from `start` until the mean of the workers' latest test accuracies
    first reaches `target` (None if it never does)."""
    latest: dict[int, float] = {}
    for r in sorted(records, key=lambda r: r["time"]):
        latest[r["rank"]] = r["test_accuracy"]
        if len(latest) == workers and statistics.mean(latest.values()) >= target:
            return float(r["time"] - start)
    return None


def run_ddp(speeds: list[float], lr: float, seed: int, samples: int) -> dict[str, Any]:
    port, n = free_port(), len(speeds)
    method = METHODS["ddp"]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank, speed in enumerate(speeds):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(n),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            cmd = [
                sys.executable,
                str(ROOT / "bench" / "ddp_worker.py"),
                f"--lr={lr}",
                f"--momentum={method['momentum']}",
                f"--seed={seed}",
                f"--batch={BATCH}",
                f"--samples={samples}",
                f"--eval-every={EVAL_EVERY}",
                f"--sample-seconds={SAMPLE_SECONDS}",
                f"--slowdown={1 / speed}",
            ]
            out = open(Path(tmp) / f"{rank}.log", "w")  # noqa: SIM115 - the child's
            procs.append((subprocess.Popen(cmd, env=env, stdout=out), out))
        for p, out in procs:
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"a DDP worker exited with {p.returncode}")
            out.close()
        lines = [
            json.loads(line)
            for rank in range(n)
            for line in (Path(tmp) / f"{rank}.log").read_text().splitlines()
        ]
    results = [r for r in lines if "result" in r]
    start = min(r["start"] for r in results)
    wall = max(r["result"]["seconds"] for r in results)
    records = [r for r in lines if "result" not in r]
    return {
        "wall_seconds": wall,
        "samples": results[0]["result"]["samples"],
        "samples_per_second": results[0]["result"]["samples"] / wall,
        "accuracy": results[0]["result"]["accuracy"],
        "time_to_target": time_to_target(records, start, n),
        "time_to_late_target": time_to_target(records, start, n, LATE_TARGET),
    }


def trainer_config(name: str, n: int, lr: float, seed: int, samples: int | None) -> TrainerConfig:
    method = METHODS[name]
    training: dict[str, Any] = {"evalEvery": EVAL_EVERY, "seed": seed}
    training.update({"budget": {"samples": samples}} if samples else {"steps": 60})
    return TrainerConfig.model_validate(
        {
            "job": "bench-" + name.replace("+", "-").replace("/", "-"),
            "replicas": n,
            "algorithm": {
                "name": name.split("+")[0],
                "topology": method.get("topology", "ring"),
            },
            "optimizer": {"lr": lr, "momentum": method["momentum"]},
            "batching": {"perWorker": BATCH, "dynamic": method.get("dynamic", False)},
            "training": training,
            "timeoutSeconds": 60,
        }
    )


def run_trainer(
    name: str, speeds: list[float], lr: float, seed: int, samples: int | None
) -> dict[str, Any]:
    n = len(speeds)
    env = {
        str(rank): {
            "DTJ_SIMULATE_SAMPLE_SECONDS": str(SAMPLE_SECONDS),
            "DTJ_SIMULATE_SLOWDOWN": str(1 / speed),
        }
        for rank, speed in enumerate(speeds)
    }
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        job = LocalJob(trainer_config(name, n, lr, seed, samples), logs=logs, extra_env=env)
        try:
            for slot in range(n):
                job.start_worker(slot)
            while job.running():
                time.sleep(0.2)
            if failed := job.failed():
                raise RuntimeError(f"{name}: workers failed: {failed}")
            results = job.results()
            start = float(job.store.get("job/start"))
        finally:
            job.close()
        records = []
        for slot in range(n):
            for line in (logs / f"worker-{slot}.log").read_text().splitlines():
                if line.startswith('{"rank"'):
                    records.append(json.loads(line))
    wall = max(r.seconds for r in results.values())
    last = max((r.get("job_samples") or 0) for r in records) if records else 0
    return {
        "wall_seconds": wall,
        "samples": last,
        "samples_per_second": sum(r.samples_per_second for r in results.values()),
        "accuracy": next(iter(results.values())).averaged_accuracy,
        "time_to_target": time_to_target(records, start, n),
        "time_to_late_target": time_to_target(records, start, n, LATE_TARGET),
        "batches": {str(r["rank"]): r["batch"] for r in records if r.get("batch") is not None},
        **staleness(list(results.values())),
    }


def staleness(results: list[Any]) -> dict[str, Any]:
    """dasgd: staleness (in updates) of the gradients the workers received, over the run."""
    received = sum(r.updates_received for r in results)
    total = sum((r.staleness_mean or 0.0) * r.updates_received for r in results)
    maxima = [r.staleness_max for r in results if r.staleness_max is not None]
    return {
        "updates_received": received,
        "updates_dropped": sum(r.updates_dropped for r in results),
        "staleness_mean": total / received if received else None,
        "staleness_max": max(maxima) if maxima else None,
    }


def run(name: str, speeds: list[float], lr: float, seed: int, samples: int) -> dict[str, Any]:
    if name == "ddp":
        return run_ddp(speeds, lr, seed, samples)
    return run_trainer(name, speeds, lr, seed, samples)


def solo_rate(speed: float) -> float:
    """One worker alone at this speed: samples/s (compute plus its own overheads)."""
    return float(run_trainer("allreduce", [speed], 0.1, 0, None)["samples_per_second"])


def score(run: dict[str, Any]) -> float:
    """Lower is better: time to target, or a penalty by the accuracy missed."""
    ttt = run["time_to_target"]
    return ttt if ttt is not None else 1e6 * (1 - run["accuracy"])


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(
    runs: list[dict[str, Any]], ideal: float, ddp: dict[str, float | None]
) -> dict[str, Any]:
    """Median and range over seeds; `ddp` holds DDP's median time to each target."""
    out: dict[str, Any] = {
        "throughput_vs_ideal": stats([r["samples_per_second"] / ideal for r in runs]),
        "wall_seconds": stats([r["wall_seconds"] for r in runs]),
        "accuracy": stats([r["accuracy"] for r in runs]),
    }
    for key, suffix in (("time_to_target", ""), ("time_to_late_target", "_late")):
        ttts = [r[key] for r in runs if r.get(key) is not None]
        out[f"reached_target{suffix}"] = f"{len(ttts)}/{len(runs)}"
        if ttts:
            out[f"time_to_target{suffix}_seconds"] = stats(ttts)
            if ddp[key]:
                out[f"time_to_target{suffix}_vs_ddp"] = stats([t / ddp[key] for t in ttts])
    return out


def compare(
    speeds: list[float],
    lrs: dict[str, float],
    seeds: list[int],
    ideal: float,
    say: Any,
    done: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every method at `speeds`; `done` holds runs of seed 0 already made (the lr grid)."""
    samples = ROUNDS * BATCH * len(speeds)
    done = done or {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in METHODS:
        runs[name] = []
        for seed in seeds:
            known = done.get(name) if seed == 0 else None
            runs[name].append(known or run(name, speeds, lrs[name], seed, samples))
    for name, rs in runs.items():
        say(f"  {name:<20} " + ", ".join(f"{r['wall_seconds']:.1f}s" for r in rs))
    ddp: dict[str, float | None] = {}
    for key in ("time_to_target", "time_to_late_target"):
        reached = [r[key] for r in runs["ddp"] if r.get(key) is not None]
        ddp[key] = statistics.median(reached) if reached else None
    return {
        "speeds": speeds,
        "samples": samples,
        "ideal_samples_per_second": ideal,
        "methods": {name: summarize(rs, ideal, ddp) for name, rs in runs.items()},
        "runs": runs,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = report["main"]["methods"]
    names = list(main)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    def bars(ax: Any, key: str, offset: float, color: str, label: str) -> None:
        """Median per method, whiskers from the lowest to the highest seed."""
        nan = {"median": float("nan"), "min": float("nan"), "max": float("nan")}
        st = [main[n].get(key, nan) for n in names]
        med = [x["median"] for x in st]
        err = [[m - x["min"] for m, x in zip(med, st, strict=True)]]
        err.append([x["max"] - m for m, x in zip(med, st, strict=True)])
        ys = [i + offset for i in range(len(names))]
        ax.barh(ys, med, height=0.4, xerr=err, color=color, label=label, capsize=2)
        ax.set_yticks(range(len(names)), names)

    bars(axes[0], "throughput_vs_ideal", 0.0, "tab:blue", "factor 3")
    axes[0].axvline(0.9, color="grey", ls="--", lw=1)
    axes[0].set_xlabel("aggregate samples/s / ideal (factor 3)")
    bars(axes[1], "time_to_target_vs_ddp", -0.2, "tab:green", f"{TARGET:.0%}")
    bars(axes[1], "time_to_target_late_vs_ddp", 0.2, "tab:olive", f"{LATE_TARGET:.0%}")
    axes[1].axvline(0.5, color="grey", ls="--", lw=1)
    axes[1].set_xlabel("time to accuracy / DDP's (missing: not reached)")
    axes[1].legend(fontsize=7)
    for name in names:
        xs, ys = [], []
        for factor, case in sorted(report["sweep"].items(), key=lambda kv: float(kv[0])):
            xs.append(float(factor))
            ys.append(case["methods"][name]["throughput_vs_ideal"]["median"])
        axes[2].plot(xs, ys, marker="o", label=name)
    axes[2].set_xlabel("slow worker's factor")
    axes[2].set_ylabel("throughput / ideal")
    axes[2].legend(fontsize=7)
    fig.suptitle("4 workers, one slower; same sample budget for every method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="3 seeds for every case")
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds of the main case (factor 3); sweeps use 1"
    )
    parser.add_argument("--out", default="bench/results/heterogeneity.json")
    args = parser.parse_args()

    def say(msg: str) -> None:
        print(msg, flush=True)

    seeds = list(range(3 if args.full else args.seeds))
    sweep_seeds = seeds if args.full else [0]
    solo = {f: solo_rate(1 / f) for f in (1, 2, 3, 4, 5)}
    say(f"solo samples/s by slowdown factor: { {f: round(r) for f, r in solo.items()} }")

    # Learning rate per method: the grid at factor 3, seed 0; best time to target.
    speeds = [1 / 3, 1.0, 1.0, 1.0]
    samples = ROUNDS * BATCH * 4
    lrs, best = {}, {}
    for name, method in METHODS.items():
        tried = {g * method["lr"]: run(name, speeds, g * method["lr"], 0, samples) for g in GRID}
        lrs[name] = min(tried, key=lambda lr: score(tried[lr]))
        best[name] = tried[lrs[name]]
        say(f"lr {name}: {lrs[name]:g} ({ {lr: round(score(r), 1) for lr, r in tried.items()} })")

    say("factor 3, all methods:")
    ideal = solo[3] + 3 * solo[1]
    report: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {
            "sample_seconds": SAMPLE_SECONDS,
            "batch": BATCH,
            "rounds_budget": ROUNDS,
            "target_accuracy": TARGET,
            "late_target_accuracy": LATE_TARGET,
            "seeds": seeds,
            "sweep_seeds": sweep_seeds,
            "lr_grid": GRID,
            "full": args.full,
        },
        "solo_samples_per_second": solo,
        "learning_rates": lrs,
        "main": compare(speeds, lrs, seeds, ideal, say, best),
        "sweep": {},
    }
    for factor in (1, 2, 3, 5):
        say(f"slow worker x{factor}:")
        if factor == 3:
            report["sweep"]["3"] = report["main"]
            continue
        case = [1 / factor, 1.0, 1.0, 1.0]
        report["sweep"][str(factor)] = compare(
            case, lrs, sweep_seeds, solo[factor] + 3 * solo[1], say
        )
    say("5 workers, speeds 1, 1, 1, 1/2, 1/4:")
    five = [1.0, 1.0, 1.0, 0.5, 0.25]
    report["five_workers"] = compare(five, lrs, sweep_seeds, 3 * solo[1] + solo[2] + solo[4], say)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot(report, out.with_suffix(".png"))
    say(f"\nwrote {out} and {out.with_suffix('.png')}")
    for name, m in report["main"]["methods"].items():
        vs = m.get("time_to_target_vs_ddp", {}).get("median")
        late = m.get("time_to_target_late_vs_ddp", {}).get("median")
        say(
            f"  {name:<20} throughput/ideal {m['throughput_vs_ideal']['median']:.2f}  "
            f"wall {m['wall_seconds']['median']:.1f}s  "
            f"time-to-{TARGET:.0%}/DDP {vs if vs is None else round(vs, 2)}  "
            f"time-to-{LATE_TARGET:.0%}/DDP {late if late is None else round(late, 2)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
