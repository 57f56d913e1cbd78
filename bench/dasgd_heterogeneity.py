"""Decentralized asynchronous SGD against synchronous SGD as heterogeneity grows.

    .venv/bin/python bench/dasgd_heterogeneity.py [--seeds 3] [--factors 1 2 3 5]

Tosi & Theobald (arXiv:2309.03754): asynchronous decentralized SGD converges
with a rate that degrades with the *average* staleness, and on heterogeneous
hardware it reaches an accuracy sooner than synchronous SGD, which waits for
the slowest worker. Setting (bench/heterogeneity.py's): 4 real worker
processes over gloo on 127.0.0.1, one of them `factor` times slower (modelled
compute slept before communicating), the same job-wide sample budget, digits
with the MLP, momentum 0.9. Per factor and seed: seconds to 93% (and 95%) test
accuracy of the workers' models, for dasgd (fan-out to all, stalenessBound 4)
and allreduce (synchronous), and dasgd's measured staleness (mean and max, in
updates) and dropped gradients. Each method's lr is picked from a grid at
factor 3, seed 0. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import report as report_file  # bench/report.py
import torch

sys.path.insert(0, str(Path(__file__).parent))
import heterogeneity as h  # the shared harness of the real-process benchmarks

METHODS = ("allreduce", "dasgd")


def stats(values: list[float | None]) -> dict[str, Any]:
    done = [v for v in values if v is not None]
    return {
        "median": statistics.median(done) if len(done) == len(values) else None,
        "min": min(done) if done else None,
        "max": max(done) if done else None,
        "reached": f"{len(done)}/{len(values)}",
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = report["factors"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    for method in METHODS:
        for key, style in (("time_to_target", "-"), ("time_to_late_target", ":")):
            st = [report["summary"][str(f)][method][key] for f in factors]
            ys = [s["median"] if s["median"] is not None else float("nan") for s in st]
            lo = [y - (s["min"] or y) for y, s in zip(ys, st, strict=True)]
            hi = [(s["max"] or y) - y for y, s in zip(ys, st, strict=True)]
            target = h.TARGET if key == "time_to_target" else h.LATE_TARGET
            ax.errorbar(
                factors,
                ys,
                yerr=[lo, hi],
                marker="o",
                linestyle=style,
                capsize=3,
                label=f"{method}, {target:.0%}",
            )
    ax.set_xlabel("slow worker's factor (1 = all equal)")
    ax.set_ylabel("seconds to test accuracy (median, min-max)")
    ax.set_title("Time to accuracy")
    ax.legend(fontsize=7)
    mean = [report["summary"][str(f)]["dasgd"]["staleness_mean"]["median"] for f in factors]
    top = [report["summary"][str(f)]["dasgd"]["staleness_max"]["median"] for f in factors]
    bx.plot(factors, mean, marker="o", label="mean staleness")
    bx.plot(factors, top, marker="s", label="max staleness")
    bx.axhline(report["drop_above"], color="grey", ls="--", lw=1, label="drop above")
    bx.set_xlabel("slow worker's factor")
    bx.set_ylabel("staleness of received gradients (updates)")
    twin = bx.twinx()
    drops = [report["summary"][str(f)]["dasgd"]["dropped_fraction"]["median"] for f in factors]
    twin.bar(factors, drops, width=0.3, alpha=0.3, color="tab:red", label="dropped (fraction)")
    twin.set_ylabel("fraction of received gradients dropped")
    bx.set_title("dasgd's measured staleness")
    bx.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"4 real workers (gloo), one slower; {report['seeds']} seeds; lr per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--factors", type=float, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--out", default="bench/results/dasgd_heterogeneity.json")
    args = parser.parse_args()
    n = 4
    samples = h.ROUNDS * h.BATCH * n

    def speeds(factor: float) -> list[float]:
        return [1 / factor] + [1.0] * (n - 1)

    lrs = {}
    for method in METHODS:
        grid = [h.METHODS[method]["lr"] * g for g in h.GRID]
        tried = [(lr, h.run(method, speeds(3), lr, 0, samples)) for lr in grid]
        lrs[method] = min(tried, key=lambda t: h.score(t[1]))[0]
        print(f"{method}: lr {lrs[method]} (grid {grid})", flush=True)
    report: dict[str, Any] = {
        "machine": {"cores": torch.get_num_threads(), "python": platform.python_version()},
        "torch": torch.__version__,
        "factors": args.factors,
        "seeds": args.seeds,
        "lr": lrs,
        "drop_above": 4 * (n - 1),  # stalenessBound x (n - 1)
        "runs": {},
        "summary": {},
    }
    for factor in args.factors:
        runs = {
            m: [h.run(m, speeds(factor), lrs[m], s, samples) for s in range(args.seeds)]
            for m in METHODS
        }
        report["runs"][str(factor)] = runs
        summary: dict[str, Any] = {}
        for m, rs in runs.items():
            summary[m] = {
                "time_to_target": stats([r["time_to_target"] for r in rs]),
                "time_to_late_target": stats([r["time_to_late_target"] for r in rs]),
                "accuracy": stats([r["accuracy"] for r in rs]),
                "staleness_mean": stats([r["staleness_mean"] for r in rs]),
                "staleness_max": stats([r["staleness_max"] for r in rs]),
                "dropped_fraction": stats(
                    [r["updates_dropped"] / max(1, r["updates_received"]) for r in rs]
                ),
            }
        a, d = summary["allreduce"]["time_to_target"], summary["dasgd"]["time_to_target"]
        summary["dasgd_vs_allreduce"] = (
            d["median"] / a["median"] if a["median"] and d["median"] else None
        )
        report["summary"][str(factor)] = summary
        st = summary["dasgd"]
        print(
            f"factor {factor:g}: to {h.TARGET:.0%} allreduce {a['median']} s, dasgd "
            f"{d['median']} s (ratio {summary['dasgd_vs_allreduce']}); dasgd staleness mean "
            f"{st['staleness_mean']['median']}, max {st['staleness_max']['median']}, "
            f"dropped {st['dropped_fraction']['median']}",
            flush=True,
        )
    out = Path(args.out)
    report_file.write(report, out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
