"""Preemption recovery: elastic gossip (dpsgd) against all-reduce restarted torchrun-style.

4 real worker processes with modelled compute (0.5 ms per sample, ~16 ms a
step of 32 samples) train through the local coordinator. One worker is
stopped mid-run, with SIGTERM (it hands off and leaves) or SIGKILL (its
heartbeat stops), and a replacement process is started for its slot as soon
as the job has dropped it. Measured, per event:

- recovery: seconds from the signal until every survivor's step rate (over a
  1 s window) is back at >= 90% of its rate before the signal;
- replacement: seconds from starting the replacement to its admission into a
  generation, and to its first progress report (its first 5 contributed steps).

Beside it, the torchrun baseline: an all-reduce job whose workers are all
stopped and restarted on any membership change. Measured: seconds from the
kill to the restarted job's first progress report; plus the work redone since
the last checkpoint (half a checkpoint interval of 100 steps, at the measured
step time). The ratio is baseline recovery over gossip recovery.

    .venv/bin/python bench/preemption.py            # writes bench/results/preemption.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time
from pathlib import Path
from typing import Any

import torch
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob

RESULTS = Path(__file__).parent / "results"
SAMPLE_SECONDS = 0.0005
CHECKPOINT_EVERY = 100
EVAL_EVERY = 5
VICTIM = 2


def config(algorithm: str, steps: int) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": f"bench-{algorithm}",
            "replicas": 4,
            "minReplicas": 2,
            "algorithm": {"name": algorithm},
            "optimizer": {"lr": 0.1, "momentum": 0.9},
            "training": {"steps": steps, "evalEvery": EVAL_EVERY},
            "timeoutSeconds": 30,
        }
    )


def env() -> dict[str, dict[str, str]]:
    return {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": str(SAMPLE_SECONDS)} for s in range(5)}


class Recorder:
    """(time, slot, step) samples of every worker's latest report."""

    def __init__(self, job: LocalJob) -> None:
        self.job, self.samples = job, []

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = time.monotonic()
            for slot, report in self.job.reports().items():
                self.samples.append((now, slot, report.step))
            time.sleep(0.05)

    def step_at(self, slot: int, t: float) -> int:
        steps = [s for (ts, sl, s) in self.samples if sl == slot and ts <= t]
        return steps[-1] if steps else 0

    def rate(self, slot: int, start: float, end: float) -> float:
        return (self.step_at(slot, end) - self.step_at(slot, start)) / (end - start)


def wait(what: str, probe: Any, recorder: Recorder, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        recorder.poll(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def gossip_event(sig: int, steps: int) -> dict[str, Any]:
    job = LocalJob(config("dpsgd", steps), extra_env=env())
    rec = Recorder(job)
    try:
        for slot in range(4):
            job.start_worker(slot)
        wait(
            "steady training",
            lambda: job.reports().get(VICTIM) and rec.step_at(VICTIM, 1e18) >= 150,
            rec,
        )
        rec.poll(3.0)
        victim = next(m for m in job.generation().members if m.startswith(f"{VICTIM}."))
        t_kill = time.monotonic()
        job.signal(VICTIM, sig)
        wait("the drop", lambda: victim not in job.generation().members, rec)
        t_drop = time.monotonic()
        job.start_worker(VICTIM)
        t_start = time.monotonic()
        survivors = [s for s in range(4) if s != VICTIM]
        before = {s: rec.rate(s, t_kill - 3.0, t_kill) for s in survivors}

        def recovered() -> float | None:
            now = time.monotonic()
            if now - t_kill < 1.0:
                return None
            ok = all(rec.rate(s, now - 1.0, now) >= 0.9 * before[s] for s in survivors)
            return now if ok else None

        t_back = wait("recovery", recovered, rec)
        joiner_step0 = rec.step_at(VICTIM, t_start)

        def admitted() -> float | None:
            gen = job.generation()
            fresh = [m for m in gen.members if m.startswith(f"{VICTIM}.") and m != victim]
            return time.monotonic() if fresh else None

        t_admit = wait("the replacement's admission", admitted, rec)
        t_first = wait(
            "the replacement's first report",
            lambda: time.monotonic() if rec.step_at(VICTIM, 1e18) > joiner_step0 else None,
            rec,
        )
        step_seconds = len(before) / max(1e-9, sum(before.values()))
        return {
            "event": signal.Signals(sig).name,
            "detected_seconds": round(t_drop - t_kill, 3),
            "recovery_seconds": round(t_back - t_kill, 3),
            "replacement_admitted_seconds": round(t_admit - t_start, 3),
            "replacement_first_report_seconds": round(t_first - t_start, 3),
            "step_seconds": round(step_seconds, 4),
            "timeline": _timeline(rec, t_kill),
        }
    finally:
        job.close()


def torchrun_baseline(steps: int) -> dict[str, Any]:
    """All-reduce, restarted as torchrun would: every worker stops, all start again."""
    job = LocalJob(config("allreduce", steps), extra_env=env())
    rec = Recorder(job)
    try:
        for slot in range(4):
            job.start_worker(slot)
        wait("steady training", lambda: rec.step_at(0, 1e18) >= 150, rec)
        rec.poll(3.0)
        now = time.monotonic()
        step_seconds = 1.0 / max(1e-9, rec.rate(0, now - 3.0, now))
        t_kill = time.monotonic()
        job.signal(VICTIM, signal.SIGKILL)
    finally:
        job.close()  # the rest go too: the group is gone
    restarted = LocalJob(config("allreduce", steps), extra_env=env())
    rec2 = Recorder(restarted)
    try:
        for slot in range(4):
            restarted.start_worker(slot)
        t_first = wait(
            "the restarted job's first report",
            lambda: time.monotonic() if len(restarted.reports()) == 4 else None,
            rec2,
        )
    finally:
        restarted.close()
    restart = t_first - t_kill
    redo = CHECKPOINT_EVERY / 2 * step_seconds
    return {
        "restart_to_first_report_seconds": round(restart, 3),
        "redone_work_seconds": round(redo, 3),
        "recovery_seconds": round(restart + redo, 3),
        "step_seconds": round(step_seconds, 4),
    }


def _timeline(rec: Recorder, t0: float) -> list[tuple[float, int, int]]:
    """Every worker's step over time, where it changed."""
    out, last = [], {}
    for t, slot, step in rec.samples:
        if last.get(slot) != step:
            out.append((round(t - t0, 3), slot, step))
            last[slot] = step
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, event in zip(axes, report["gossip"], strict=True):
        for slot in range(4):
            pts = [(t, s) for (t, sl, s) in event["timeline"] if sl == slot]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"slot {slot}", lw=1)
        ax.axvline(0, color="k", ls="--", lw=0.8)
        ax.axvline(event["recovery_seconds"], color="g", ls=":", lw=0.8)
        ax.set_title(f"{event['event']}: recovered in {event['recovery_seconds']:.1f}s")
        ax.set_xlabel("seconds from the signal")
        ax.set_ylabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"torchrun-style all-reduce restart: {report['baseline']['recovery_seconds']:.1f}s "
        f"(ratio {report['ratio_sigkill']:.1f}x SIGKILL, {report['ratio_sigterm']:.1f}x SIGTERM)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=str(RESULTS / "preemption.json"))
    args = parser.parse_args()
    gossip = [gossip_event(s, args.steps) for s in (signal.SIGTERM, signal.SIGKILL)]
    baseline = torchrun_baseline(args.steps)
    report = {
        "machine": {
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "workers": 4,
        "sample_seconds": SAMPLE_SECONDS,
        "gossip": gossip,
        "baseline": baseline,
        "ratio_sigterm": round(baseline["recovery_seconds"] / gossip[0]["recovery_seconds"], 2),
        "ratio_sigkill": round(baseline["recovery_seconds"] / gossip[1]["recovery_seconds"], 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    for g in gossip:
        print(
            f"{g['event']}: dropped after {g['detected_seconds']}s, survivors back at >=90% "
            f"after {g['recovery_seconds']}s; replacement admitted after "
            f"{g['replacement_admitted_seconds']}s, first report after "
            f"{g['replacement_first_report_seconds']}s"
        )
    b = baseline
    print(
        f"torchrun-style restart: {b['restart_to_first_report_seconds']}s to the first report "
        f"+ {b['redone_work_seconds']}s redone = {b['recovery_seconds']}s; "
        f"ratio {report['ratio_sigterm']}x (SIGTERM), {report['ratio_sigkill']}x (SIGKILL)"
    )
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
