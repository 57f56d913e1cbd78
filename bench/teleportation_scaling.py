"""Teleportation's scaling result, reproduced in the in-process simulator.

    .venv/bin/python bench/teleportation_scaling.py [--sizes 16 64 256] [--max-rounds 1500]

Takezawa & Stich (ICLR 2025): decentralized SGD on a sparse topology needs
more iterations as n grows; Teleportation, with a proper number k of active
workers, does not. Setting: the built-in synthetic 10-class task, logistic
regression, data split across workers by Dirichlet(alpha = 0.1), batch 32,
plain SGD with lr 0.1. For each n: rounds until the target test accuracy
(by default the mean accuracy of the models the workers hold, which is where
the consensus error shows) for teleportation (k found by its doubling search,
whose cost is reported separately), dpsgd on a ring, dpsgd on the one-peer
exponential graph, and allreduce as the reference. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from dtj_trainer import loop, simulator
from dtj_trainer.algorithms.teleportation import active_set
from dtj_trainer.config import TrainerConfig

METHODS = {
    "teleportation": {"name": "teleportation", "activeNodes": "auto", "topology": "ring"},
    "dpsgd-ring": {"name": "dpsgd", "topology": "ring"},
    "dpsgd-one-peer-exp": {"name": "dpsgd", "topology": "one-peer-exponential"},
    "allreduce": {"name": "allreduce"},
}


def averaged_accuracy(workers: list[loop.Worker], step: int, method: str, metric: str) -> float:
    """Test accuracy of the mean model, or the mean test accuracy of the local models
    (teleportation: over the k slot models)."""
    if method == "teleportation":
        algo = workers[0].algo
        k = algo.k  # type: ignore[union-attr]
        holders = active_set(len(workers), k, workers[0].cfg.training.seed, step - 1)
        xs = [workers[r].local.params() for r in holders]
    else:
        xs = [w.local.params() for w in workers]
    w0 = workers[0]
    saved = w0.local.params()
    if metric == "local-models":
        accs = []
        for x in xs:
            w0.local.set_params(x)
            accs.append(loop.accuracy(w0.local.model, w0.dataset.x_test, w0.dataset.y_test))
        w0.local.set_params(saved)
        return sum(accs) / len(accs)
    w0.local.set_params(torch.stack(xs).mean(0))
    acc = loop.accuracy(w0.local.model, w0.dataset.x_test, w0.dataset.y_test)
    w0.local.set_params(saved)
    return acc


def run(
    method: str, n: int, *, target: float, max_rounds: int, every: int, metric: str
) -> dict[str, Any]:
    cfg = TrainerConfig.model_validate(
        {
            "job": f"bench-{method}-{n}",
            "replicas": n,
            "algorithm": METHODS[method],
            "optimizer": {"lr": 0.1},
            "batching": {"perWorker": 32},
            "training": {
                "model": "logreg",
                "dataset": "synthetic",
                "steps": max_rounds,
                "evalEvery": every,
                "dataSplit": {"kind": "dirichlet", "alpha": 0.1},
            },
        }
    )
    curve: list[tuple[int, float]] = []
    reached: list[int] = []

    def on_round(step: int, workers: list[loop.Worker]) -> None:
        acc = averaged_accuracy(workers, step, method, metric)
        curve.append((step, acc))
        if acc >= target and not reached:
            reached.append(step)
            # Idle teleportation workers run ahead to their next active round:
            # stop everyone at a round none of them has passed yet.
            stop = (max(w.current_step for w in workers) // every + 2) * every
            for w in workers:
                w.stop_after = stop

    t0 = time.perf_counter()
    results, _ = simulator.simulate(cfg, on_round=on_round)
    return {
        "rounds_to_target": reached[0] if reached else None,
        "k": results[0].active_nodes,
        "k_search_rounds": max_rounds if method == "teleportation" else 0,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        ys = [report["runs"][str(n)][method]["rounds_to_target"] for n in sizes]
        ax.plot(
            sizes,
            [y if y is not None else float("nan") for y in ys],
            marker="o",
            label=method,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers n")
    ax.set_ylabel(f"rounds to {100 * report['target']:.0f}% test accuracy ({report['metric']})")
    ax.set_title("Dirichlet(0.1) split, synthetic task, logistic regression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument(
        "--metric",
        choices=["local-models", "average-model"],
        default="local-models",
        help="mean test accuracy of the models the workers hold (what any node would "
        "deploy; the consensus error shows here), or of their average",
    )
    parser.add_argument("--max-rounds", type=int, default=1500)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="bench/results/teleportation_scaling.json")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "sizes": args.sizes,
        "target": args.target,
        "metric": args.metric,
        "max_rounds": args.max_rounds,
        "runs": {},
    }
    for n in args.sizes:
        report["runs"][str(n)] = {}
        for method in METHODS:
            r = run(
                method,
                n,
                target=args.target,
                max_rounds=args.max_rounds,
                every=args.every,
                metric=args.metric,
            )
            report["runs"][str(n)][method] = r
            k = f" (k={r['k']})" if r["k"] else ""
            print(
                f"n={n:>4} {method:>20}{k}: rounds to {100 * args.target:.0f}% = "
                f"{r['rounds_to_target']}  [{r['seconds']:.0f}s]",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
