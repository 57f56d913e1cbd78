"""Teleportation's scaling result (Takezawa & Stich, ICLR 2025), in the simulator.

    .venv/bin/python bench/teleportation_scaling.py [--sizes 16 64] [--seeds 3]

The paper: decentralized SGD on a sparse topology needs more iterations as n
grows; Teleportation, with a proper number k < n of active workers, does not,
and its search finds that k at a small cost. Setting: the `clusters` task
(scikit-learn's make_classification, 10 classes of 3 clusters in 40
dimensions; harder than digits: an MLP's task), the bundled MLP, data split
across workers by Dirichlet(alpha = 0.1), batch 32 per active worker, plain
SGD. For each n, rounds until the target test accuracy of the models the
workers hold (their mean accuracy: where consensus error shows) for
- teleportation at every fixed k in {1, 2, 4, ..., n} (the sweep that shows
  the optimal k and how it moves with n),
- teleportation with k searched (successive halving within T rounds; its
  cost is reported and drawn beside the rounds after it),
- dpsgd on a ring and on the one-peer exponential graph, and allreduce.
The learning rate of each method is picked from a grid on seed 0 (fewest
rounds to target), then every seed runs at it; medians and min-max over
seeds. Bytes sent per worker per round, and to the target, are reported
beside the rounds. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import report as report_file  # bench/report.py
import torch
from dtj_trainer import loop, simulator
from dtj_trainer.algorithms.teleportation import active_set
from dtj_trainer.config import TrainerConfig

LRS = (0.1, 0.2, 0.4)
BASELINES = {
    "dpsgd-ring": {"name": "dpsgd", "topology": "ring"},
    "dpsgd-one-peer-exp": {"name": "dpsgd", "topology": "one-peer-exponential"},
    "allreduce": {"name": "allreduce"},
}


def methods(n: int) -> dict[str, dict[str, Any]]:
    out = dict(BASELINES)
    for k in (2**j for j in range(n.bit_length()) if 2**j <= n):
        out[f"teleportation-k{k}"] = {"name": "teleportation", "activeNodes": k}
    out["teleportation-auto"] = {"name": "teleportation", "activeNodes": "auto"}
    return out


def local_accuracy(workers: list[loop.Worker], step: int) -> float:
    """Mean test accuracy of the models the workers hold (teleportation: the k slots)."""
    algo = workers[0].algo
    if getattr(algo, "k", None) is not None:
        k = algo.k  # type: ignore[union-attr]
        holders = active_set(len(workers), k, workers[0].cfg.training.seed, step - 1)
        xs = [workers[r].local.params() for r in holders]
    else:
        xs = [w.local.params() for w in workers]
    w0 = workers[0]
    saved = w0.local.params()
    accs = []
    for x in xs:
        w0.local.set_params(x)
        accs.append(w0.scores()["test_accuracy"])
    w0.local.set_params(saved)
    return sum(accs) / len(accs)


def run(
    algorithm: dict[str, Any],
    n: int,
    *,
    lr: float,
    seed: int,
    target: float,
    max_rounds: int,
    every: int,
) -> dict[str, Any]:
    cfg = TrainerConfig.model_validate(
        {
            "job": "bench",
            "replicas": n,
            "algorithm": {"topology": "ring", **algorithm},
            "optimizer": {"lr": lr},
            "batching": {"perWorker": 32},
            "training": {
                "model": "mlp",
                "dataset": "clusters",
                "steps": max_rounds,
                "evalEvery": every,
                "seed": seed,
                "dataSplit": {"kind": "dirichlet", "alpha": 0.1},
            },
        }
    )
    curve: list[tuple[int, float]] = []
    reached: list[int] = []
    sent: dict[int, float] = {}

    def on_round(step: int, workers: list[loop.Worker]) -> int | None:
        acc = local_accuracy(workers, step)
        curve.append((step, acc))
        if acc >= target and not reached:
            reached.append(step)
            sent[step] = statistics.mean(w.transport.counters.bytes_sent for w in workers)
            # Idle teleportation workers run ahead to their next active round:
            # stop everyone at a round none of them has passed yet.
            return (max(w.current_step for w in workers) // every + 2) * every
        return None

    t0 = time.perf_counter()
    results, workers = simulator.simulate(cfg, on_round=on_round)
    rounds = reached[0] if reached else None
    search = workers[0].search_log
    total_sent = statistics.mean(w.transport.counters.bytes_sent for w in workers)
    return {
        "lr": lr,
        "seed": seed,
        "rounds_to_target": rounds,
        "k": results[0].active_nodes,
        "k_search_rounds": sum(int(e["rounds"]) for e in search),
        "k_search": search,
        # bytes each worker sent, on average: up to the target (search included)
        "bytes_per_worker_to_target": sent.get(rounds) if rounds is not None else None,
        "bytes_per_worker_per_round": total_sent / max(1, workers[0].current_step),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def summary(runs: list[dict[str, Any]], key: str = "rounds_to_target") -> dict[str, Any]:
    values = [r[key] for r in runs]
    done = [v for v in values if v is not None]
    return {
        "median": statistics.median(done) if len(done) == len(values) else None,
        "min": min(done) if done else None,
        "max": max(done) if len(done) == len(values) else None,
        "reached": f"{len(done)}/{len(values)}",
    }


def summarize(report: dict[str, Any], n: int) -> None:
    """Medians over seeds, the best fixed k and the search's picks, from report["runs"]."""
    runs = report["runs"][str(n)]
    ks = [int(m.split("-k")[1]) for m in runs if m.startswith("teleportation-k")]
    report["ks"][str(n)] = ks
    report["summary"][str(n)] = {
        m: {
            "lr": rs[0]["lr"],
            "rounds": summary(rs),
            "search": summary(rs, "k_search_rounds"),
            "bytes_to_target": summary(rs, "bytes_per_worker_to_target"),
            "bytes_per_round": statistics.median(r["bytes_per_worker_per_round"] for r in rs),
            "k_picked": [r["k"] for r in rs] if rs[0]["k"] else None,  # per seed
        }
        for m, rs in runs.items()
    }
    fixed = {k: report["summary"][str(n)][f"teleportation-k{k}"]["rounds"] for k in ks}
    report["best_k"][str(n)] = min(ks, key=lambda k: fixed[k]["median"] or math.inf)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 4.8))

    def med(n: int, method: str, key: str = "rounds") -> float:
        v = report["summary"][str(n)][method][key]["median"]
        return float("nan") if v is None else v

    def band(n: int, method: str) -> tuple[float, float]:
        s = report["summary"][str(n)][method]["rounds"]
        lo = s["min"] if s["min"] is not None else float("nan")
        hi = s["max"] if s["max"] is not None else float("nan")
        return lo, hi

    def capped(n: int, method: str) -> list[int]:
        """Each seed's rounds, a seed that never reached the target counted at the cap."""
        runs = report["runs"][str(n)][method]
        return [r["rounds_to_target"] or report["max_rounds"] for r in runs]

    def draw(axis: Any, method: str, label: str, **kw: Any) -> None:
        values = [capped(n, method) for n in sizes]
        ys = [statistics.median(v) for v in values]
        lows = [y - min(v) for y, v in zip(ys, values, strict=True)]
        highs = [max(v) - y for y, v in zip(ys, values, strict=True)]
        if any(not r["rounds_to_target"] for n in sizes for r in report["runs"][str(n)][method]):
            label += f" (a seed missed: counted at {report['max_rounds']})"
        axis.errorbar(sizes, ys, yerr=[lows, highs], marker="o", capsize=3, label=label, **kw)

    for method in BASELINES:
        draw(ax, method, method)
    best = {n: report["best_k"][str(n)] for n in sizes}
    ys = [med(n, f"teleportation-k{best[n]}") for n in sizes]
    ax.plot(sizes, ys, marker="s", label="teleportation, best fixed k")
    auto = [med(n, "teleportation-auto") for n in sizes]
    cost = [med(n, "teleportation-auto", "search") for n in sizes]
    ax.plot(sizes, auto, marker="^", label="teleportation, k searched (rounds after the search)")
    ax.plot(
        sizes,
        [a + c for a, c in zip(auto, cost, strict=True)],
        marker="^",
        linestyle=":",
        label="teleportation, k searched, search included",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers n")
    ax.set_ylabel(f"rounds to {100 * report['target']:.0f}% (median, min-max over seeds)")
    ax.set_title("Rounds to target as n grows")
    ax.legend(fontsize=7)

    for n in sizes:
        ks = [k for k in report["ks"][str(n)]]
        bx.plot(ks, [med(n, f"teleportation-k{k}") for k in ks], marker="o", label=f"n={n}")
        for picked in report["summary"][str(n)]["teleportation-auto"]["k_picked"]:
            bx.scatter(
                [picked],
                [med(n, f"teleportation-k{picked}")],
                s=140,
                facecolors="none",
                edgecolors="black",
            )
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("active workers k (fixed)")
    bx.set_ylabel("rounds to target (median over seeds)")
    bx.set_title("Teleportation's fixed-k sweep (circles: the search's pick per seed)")
    bx.legend(fontsize=8)

    names = [*BASELINES, "teleportation-best-k", "teleportation-auto"]
    width = 0.8 / len(names)
    for i, method in enumerate(names):
        vals = []
        for n in sizes:
            m = f"teleportation-k{best[n]}" if method == "teleportation-best-k" else method
            v = report["summary"][str(n)][m]["bytes_to_target"]["median"]
            vals.append(float("nan") if v is None else v / 1e6)
        xs = [j + i * width for j in range(len(sizes))]
        cx.bar(xs, vals, width=width, label=method)
    cx.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"n={n}" for n in sizes])
    cx.set_ylabel("MB sent per worker to the target (median)")
    cx.set_title("Communication to the target")
    cx.legend(fontsize=7)
    fig.suptitle(
        f"clusters task, MLP, Dirichlet(0.1) split, {report['seeds']} seeds, lr per method"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.60)
    parser.add_argument("--max-rounds", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="bench/results/teleportation_scaling.json")
    parser.add_argument(
        "--replot", action="store_true", help="summarise and plot the runs already in --out"
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        stored = json.loads(out.read_text())
        for n in stored["sizes"]:
            summarize(stored, n)
        report_file.write(stored, out, plot)
        return 0
    report: dict[str, Any] = {
        "machine": {"cores": torch.get_num_threads(), "python": platform.python_version()},
        "torch": torch.__version__,
        "sizes": args.sizes,
        "seeds": args.seeds,
        "target": args.target,
        "max_rounds": args.max_rounds,
        "lr_grid": list(LRS),
        "runs": {},
        "summary": {},
        "best_k": {},
        "ks": {},
    }
    settings = dict(target=args.target, max_rounds=args.max_rounds, every=args.every)
    for n in args.sizes:
        runs: dict[str, list[dict[str, Any]]] = {}
        for method, algorithm in methods(n).items():
            tuning = [run(algorithm, n, lr=lr, seed=0, **settings) for lr in LRS]
            best = min(tuning, key=lambda r: r["rounds_to_target"] or math.inf)
            runs[method] = [best] + [
                run(algorithm, n, lr=best["lr"], seed=s, **settings) for s in range(1, args.seeds)
            ]
            s = summary(runs[method])
            print(
                f"n={n:>4} {method:>22}: lr {best['lr']}, rounds to "
                f"{100 * args.target:.0f}% {s['median']} ({s['min']}-{s['max']}, "
                f"{s['reached']})  k={best['k']}  search {best['k_search_rounds']} rounds  "
                f"[{sum(r['seconds'] for r in tuning + runs[method][1:]):.0f}s]",
                flush=True,
            )
        report["runs"][str(n)] = runs
        summarize(report, n)
    report_file.write(report, out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
