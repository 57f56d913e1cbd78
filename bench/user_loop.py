"""The user's own loop (examples/lm/train.py): what the API costs, and DDP side by side.

    .venv/bin/python bench/user_loop.py            # --replot: from the last JSON

1. Overhead at n = 1: the example standalone (dtj_trainer.init(), the wrapped
   optimizer, the turns with the method's coroutine) against the same script in plain
   torch (bench/lm_ddp.py, no wrapper), alternated, 3 runs each: samples/s over
   the training loop, and the ratio.
2. n = 4 (dpsgd, one-peer-exponential, 4 local processes): each worker's time
   split into compute, communication (its reported waiting for peers) and data
   (reading and collating its batches from the memory-mapped token file).
3. One 3x slower worker (modelled compute, as bench/heterogeneity.py): plain torch
   DDP against the job (allreduce and dpsgd, each with dynamic batching), the
   same job-wide samples: validation loss against wall time (from the processes'
   start), the final validation loss, and the time each takes to the worst of
   the final losses (a level all reach), as a ratio to DDP's.
JSON and PNG in bench/results/.
"""

from __future__ import annotations

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

from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "examples" / "lm" / "train.py")]
BASELINE = [sys.executable, str(ROOT / "bench" / "lm_ddp.py")]
STEPS, BATCH, EVAL = 300, 32, 25
SAMPLE_SECONDS = 0.002  # modelled compute: 64 ms for a batch of 32 on a fast worker
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def result_line(text: str) -> dict[str, Any]:
    return next(json.loads(x) for x in text.splitlines() if x.startswith('{"steps"'))


def overhead(reps: int = 3) -> dict[str, Any]:
    plain, wrapped = [], []
    for _ in range(reps):
        out = subprocess.run(BASELINE, env=ENV, capture_output=True, text=True, check=True)
        res = next(json.loads(x) for x in out.stdout.splitlines() if '"result"' in x)["result"]
        plain.append(res["samples"] / res["seconds"])
        env = {k: v for k, v in ENV.items() if k != "DTJ_CONFIG"}
        out = subprocess.run(SCRIPT, env=env, capture_output=True, text=True, check=True)
        wrapped.append(result_line(out.stdout)["samples_per_second"])
    p, w = statistics.median(plain), statistics.median(wrapped)
    return {
        "plain_samples_per_second": plain,
        "wrapped_samples_per_second": wrapped,
        "slowdown": p / w - 1,  # the API's cost: 0.03 is 3% slower
    }


def job(
    speeds: list[float], *, dynamic: bool, samples: int | None, algorithm: str = "dpsgd"
) -> dict[str, Any]:
    training: dict[str, Any] = {"evalEvery": EVAL}
    training |= {"budget": {"samples": samples}} if samples else {"steps": STEPS}
    cfg = TrainerConfig.model_validate(
        {
            "job": "lm-bench",
            "replicas": len(speeds),
            "algorithm": {"name": algorithm, "topology": "one-peer-exponential"},
            "batching": {"perWorker": BATCH, "dynamic": dynamic},
            "training": training,
        }
    )
    env = {
        str(s): {
            "DTJ_SIMULATE_SAMPLE_SECONDS": str(SAMPLE_SECONDS if samples else 0),
            "DTJ_SIMULATE_SLOWDOWN": str(1 / speed),
        }
        for s, speed in enumerate(speeds)
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalJob(cfg, logs=Path(tmp), extra_env=env, command=SCRIPT, working_dir=ROOT)
        try:
            start = time.time()
            for slot in range(len(speeds)):
                local.start_worker(slot)
            while local.running():
                time.sleep(0.2)
            assert not local.failed(), local.failed()
            wall = time.time() - start
            reports = [
                json.loads(x)
                for s in range(len(speeds))
                for x in (Path(tmp) / f"worker-{s}.log").read_text().splitlines()
                if x.startswith('{"rank"')
            ]
            results = local.results()
        finally:
            local.close()
    last = {r["rank"]: r for r in reports}
    first = {r["rank"]: r for r in reversed(reports)}
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in reports:
        if "val_loss" in (r.get("metrics") or {}):
            by_step.setdefault(r["step"], []).append(r)
    points = [  # the workers' mean at each evaluation, when the last of them reached it
        (max(r["time"] for r in rs), statistics.mean(r["metrics"]["val_loss"] for r in rs))
        for rs in by_step.values()
    ]
    return {
        "wall_seconds": wall,
        "val_loss": (results[0].metrics or {}).get("val_loss"),
        "curve": curve(points, start),
        "comm_share": {
            s: r["comm_wait_seconds"] / max(r["time"] - start, 1e-9) for s, r in last.items()
        },
        # Reading and collating batches (from the memory-mapped token file, leased by the
        # data ledger), as a share of each worker's time: what the loop waits for data.
        # Between a worker's first and last report, so start-up does not dilute it.
        "data_share": {
            s: (r["data_wait_seconds"] - first[s]["data_wait_seconds"])
            / max(r["time"] - first[s]["time"], 1e-9)
            for s, r in last.items()
        },
    }


def curve(points: list[tuple[float, float | None]], t0: float) -> list[tuple[float, float]]:
    """(seconds since t0, mean validation loss of the reports at about that time)."""
    pts = sorted((t - t0, v) for t, v in points if v is not None)
    return [(round(t, 2), v) for t, v in pts]


def ddp(speeds: list[float]) -> dict[str, Any]:
    port = free_port()
    procs, logs = [], []
    launched = time.time()  # as for the job: from the processes' start
    for rank, speed in enumerate(speeds):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": str(len(speeds))}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [*BASELINE, f"--steps={STEPS}", f"--eval-every={EVAL}"]
        cmd += [f"--sample-seconds={SAMPLE_SECONDS}", f"--slowdown={1 / speed}"]
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - the child's, read below
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log))
    for p in procs:
        if p.wait(timeout=1200) != 0:
            raise RuntimeError(f"a DDP worker exited with {p.returncode}")
    lines = []
    for log in logs:
        log.seek(0)
        lines += [json.loads(x) for x in log.read().splitlines()]
    results = [r for r in lines if "result" in r]
    points = [(r["time"], r["val_loss"]) for r in lines if "result" not in r and r["rank"] == 0]
    return {
        "wall_seconds": max(r["result"]["seconds"] for r in results),
        "val_loss": results[0]["result"]["val_loss"],
        "curve": curve(points, launched),
    }


def time_to(curve_: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in curve_ if v <= target), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    out: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count()}
    print("1/3 overhead at n = 1 ...", flush=True)
    out["overhead"] = overhead()
    print(f"    wrapped is {100 * out['overhead']['slowdown']:+.1f}% slower", flush=True)
    print("2/3 n = 4, compute and communication ...", flush=True)
    four = job([1, 1, 1, 1], dynamic=False, samples=None)
    out["n4"] = {k: four[k] for k in ("wall_seconds", "comm_share", "data_share")}
    print(f"    communication share per worker {four['comm_share']}", flush=True)
    print(f"    data wait share per worker {four['data_share']} (target <= 0.05)", flush=True)
    print("3/3 one 3x slower worker: DDP and the job ...", flush=True)
    speeds = [1 / 3, 1, 1, 1]
    budget = STEPS * BATCH * len(speeds)
    arms = {
        "ddp": ddp(speeds),
        "allreduce+dynamic": job(speeds, dynamic=True, samples=budget, algorithm="allreduce"),
        "dpsgd+dynamic": job(speeds, dynamic=True, samples=budget),
    }
    out["slow_worker"] = compare(arms)
    print(f"    final val loss {out['slow_worker']['final_val_loss']}", flush=True)
    return write(out)


def compare(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Side by side: the time each arm's curve takes to a level every curve reaches (the
    highest of the curves' lowest points; a curve is the workers' own models, so the
    averaged model's final loss can be below it), and its ratio to DDP's."""
    target = max(min(v for _, v in r["curve"]) for r in arms.values())
    times = {name: time_to(r["curve"], target) for name, r in arms.items()}
    print(f"    time to val loss {target:.3f}: {times}", flush=True)
    return {
        "arms": arms,
        "target_val_loss": target,
        "time_to_target": times,
        "time_ratio_to_ddp": {n: t / times["ddp"] for n, t in times.items() if t and times["ddp"]},
        "final_val_loss": {n: r["val_loss"] for n, r in arms.items()},
        "wall_seconds": {n: r["wall_seconds"] for n, r in arms.items()},
        "wall_ratio_to_ddp": {
            n: r["wall_seconds"] / arms["ddp"]["wall_seconds"] for n, r in arms.items()
        },
    }


def write(out: dict[str, Any]) -> int:
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "user_loop.json").write_text(json.dumps(out, indent=2))
    plot(out, results / "user_loop.png")
    print(f"wrote {results / 'user_loop.json'}", flush=True)
    return 0


def replot() -> int:
    """Recompute the comparison and the plot from the last run's JSON (no training)."""
    out = json.loads((ROOT / "bench" / "results" / "user_loop.json").read_text())
    out["slow_worker"] = compare(out["slow_worker"]["arms"])
    return write(out)


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, arm in out["slow_worker"]["arms"].items():
        pts = arm["curve"]
        label = "torch DDP" if name == "ddp" else f"dtj: {name.replace('+', ' + ')} batching"
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", label=label)
    ax.set_xlabel("wall seconds")
    ax.set_ylabel("validation loss (byte-level GPT)")
    ax.set_title("examples/lm/train.py, 4 workers, one 3x slower")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(replot() if "--replot" in sys.argv else main())
