"""GoSGD's communication rate p (Blot et al., arXiv:1611.09726), in the simulator.

    .venv/bin/python bench/gosgd_rate.py [--seeds 3]

The paper: gossip training reaches the accuracy of its baselines while
communicating little, and the exchange probability p trades consensus for
communication. Setting: 8 workers of equal speed in the simulator's
asynchronous mode (messages delivered after the sender's compute plus a
modelled latency), the `clusters` task with the bundled MLP, an IID split,
batch 32, 600 rounds each, plain SGD. For p in 0.01 ... 1: the final test
accuracy of the workers' own models and of their weighted average, the
consensus distance (1/n) sum ||x_i - x_bar||^2, and the bytes each worker
sent. Beside it, dpsgd on the one-peer exponential graph (one model a round:
the bytes of gosgd at p = 1) and on a ring (two), at matched or known bytes.
The learning rate of each arm is picked from a grid on seed 0 (best own-model
accuracy). Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import report as report_file  # bench/report.py
import torch
from dtj_trainer import simulator
from dtj_trainer.config import TrainerConfig

N = 8
ROUNDS = 600
LRS = (0.1, 0.2, 0.4)
PS = (0.01, 0.03, 0.1, 0.3, 1.0)


def arms() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        f"gosgd p={p:g}": {"name": "gosgd", "gossipProbability": p} for p in PS
    }
    out["dpsgd one-peer-exp"] = {"name": "dpsgd", "topology": "one-peer-exponential"}
    out["dpsgd ring"] = {"name": "dpsgd", "topology": "ring"}
    return out


def run(algorithm: dict[str, Any], *, lr: float, seed: int) -> dict[str, Any]:
    cfg = TrainerConfig.model_validate(
        {
            "job": "bench",
            "replicas": N,
            "algorithm": algorithm,
            "optimizer": {"lr": lr},
            "batching": {"perWorker": 32},
            "training": {
                "model": "mlp",
                "dataset": "clusters",
                "steps": ROUNDS,
                "evalEvery": ROUNDS,
                "seed": seed,
            },
        }
    )
    t0 = time.perf_counter()
    results, workers = simulator.simulate(cfg)
    return {
        "lr": lr,
        "seed": seed,
        "own_accuracy": statistics.mean(r.worker_accuracy for r in results),
        "averaged_accuracy": results[0].averaged_accuracy,
        "consensus_distance": results[0].consensus_distance,
        "mb_sent_per_worker": statistics.mean(w.transport.counters.bytes_sent for w in workers)
        / 1e6,
        "seconds": time.perf_counter() - t0,
    }


def med(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    gossip = [f"gosgd p={p:g}" for p in PS]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    for key, label, marker in (
        ("own_accuracy", "own models", "o"),
        ("averaged_accuracy", "average model", "s"),
    ):
        xs = [s[a]["mb_sent_per_worker"]["median"] for a in gossip]
        ys = [s[a][key]["median"] for a in gossip]
        lo = [y - s[a][key]["min"] for a, y in zip(gossip, ys, strict=True)]
        hi = [s[a][key]["max"] - y for a, y in zip(gossip, ys, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=f"gosgd, {label}")
        for p, x, y in zip(PS, xs, ys, strict=True):
            if key == "own_accuracy":
                ax.annotate(f"p={p:g}", (x, y), textcoords="offset points", xytext=(4, -12))
    for arm, color in (("dpsgd one-peer-exp", "tab:red"), ("dpsgd ring", "tab:purple")):
        ax.scatter(
            [s[arm]["mb_sent_per_worker"]["median"]],
            [s[arm]["own_accuracy"]["median"]],
            marker="D",
            color=color,
            label=f"{arm}, own models",
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"MB sent per worker in {ROUNDS} rounds")
    ax.set_ylabel("test accuracy (median, min-max over seeds)")
    ax.set_title("Accuracy against communication")
    ax.legend(fontsize=7)
    bx.plot(PS, [s[a]["consensus_distance"]["median"] for a in gossip], marker="o", label="gosgd")
    for arm, color in (("dpsgd one-peer-exp", "tab:red"), ("dpsgd ring", "tab:purple")):
        bx.axhline(s[arm]["consensus_distance"]["median"], color=color, ls="--", label=arm)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("exchange probability p")
    bx.set_ylabel("consensus distance at the end")
    bx.set_title("Consensus against p")
    bx.legend(fontsize=7)
    fig.suptitle(f"{N} workers, clusters task, MLP, IID, {report['seeds']} seeds, lr per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/gosgd_rate.json")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {"cores": torch.get_num_threads(), "python": platform.python_version()},
        "torch": torch.__version__,
        "workers": N,
        "rounds": ROUNDS,
        "seeds": args.seeds,
        "lr_grid": list(LRS),
        "runs": {},
        "summary": {},
    }
    for arm, algorithm in arms().items():
        tuning = [run(algorithm, lr=lr, seed=0) for lr in LRS]
        best = max(tuning, key=lambda r: r["own_accuracy"])
        runs = [best] + [run(algorithm, lr=best["lr"], seed=s) for s in range(1, args.seeds)]
        report["runs"][arm] = runs
        report["summary"][arm] = {
            "lr": best["lr"],
            **{
                key: med(runs, key)
                for key in (
                    "own_accuracy",
                    "averaged_accuracy",
                    "consensus_distance",
                    "mb_sent_per_worker",
                )
            },
        }
        s = report["summary"][arm]
        print(
            f"{arm:>20}: lr {best['lr']}, own {s['own_accuracy']['median']:.3f}, "
            f"average {s['averaged_accuracy']['median']:.3f}, consensus "
            f"{s['consensus_distance']['median']:.2e}, "
            f"{s['mb_sent_per_worker']['median']:.1f} MB/worker",
            flush=True,
        )
    out = Path(args.out)
    report_file.write(report, out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
