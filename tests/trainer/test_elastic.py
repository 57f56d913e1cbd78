"""Workers leave and join a running job; nobody else restarts (4 real processes).

Each run trains 4 workers through the local coordinator (store + registrar),
stops one mid-run (SIGTERM: it hands its model off and leaves; SIGKILL: its
heartbeat stops), then starts a replacement for its slot. Compared with an
undisturbed run of the same seed.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob
from dtj_trainer.metrics import Progress

pytestmark = pytest.mark.procs

SETTINGS = {
    "dpsgd": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
    "gosgd": {"optimizer": {"lr": 0.1}},
    "allreduce": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
}
STEPS, STOP_AT, VICTIM = 800, 200, 2


def config(algorithm: str) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": f"elastic-{algorithm}",
            "replicas": 4,
            "minReplicas": 2,
            "algorithm": {"name": algorithm},
            "training": {"steps": STEPS, "evalEvery": 20},
            "timeoutSeconds": 30,
            **SETTINGS[algorithm],
        }
    )


@dataclass
class Outcome:
    accuracy: float
    detected_after: float | None  # seconds from the signal to a generation without it
    history: dict[int, list[list[Progress]]]  # slot -> per incarnation -> reports
    exit_codes: dict[int, int]
    survivors_kept_pid: bool


def history(logs: Path, slot: int) -> list[list[Progress]]:
    """A worker's progress reports from its log, one list per incarnation."""
    out: list[list[Progress]] = []
    for line in (logs / f"worker-{slot}.log").read_text().splitlines():
        if "joined as" in line:
            out.append([])
        elif line.startswith("{") and '"loss"' in line:
            out[-1].append(Progress(**json.loads(line)))
    return out


def wait(what: str, probe, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run(tmp_path: Path, algorithm: str, sig: int | None) -> Outcome:
    logs = tmp_path / f"{algorithm}-{sig}"
    # Steps of modelled compute (~16 ms), as on real hardware, not a tiny model's ~1 ms.
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": "0.0005"} for s in range(4)}
    job = LocalJob(config(algorithm), logs=logs, extra_env=env)
    try:
        for slot in range(4):
            job.start_worker(slot)
        pids = {s: p.pid for s, p in job.procs.items()}
        detected = None
        if sig is not None:
            wait("the victim's progress", lambda: job.reports().get(VICTIM, _none).step >= STOP_AT)
            t0 = time.monotonic()
            job.signal(VICTIM, sig)
            victim = next(m for m in job.generation().members if m.startswith(f"{VICTIM}."))
            wait("a generation without the victim", lambda: victim not in job.generation().members)
            detected = time.monotonic() - t0
            job.start_worker(VICTIM)  # the replacement, as soon as the slot is free
        wait("the end of training", lambda: not job.running(), timeout=300)
        codes = {s: p.returncode for s, p in job.procs.items()}
        kept = all(job.procs[s].pid == pids[s] for s in range(4) if s != VICTIM)
        return Outcome(
            job.result().averaged_accuracy,
            detected,
            {s: history(logs, s) for s in range(4)},
            codes,
            kept,
        )
    finally:
        job.close()


_none = Progress(rank=-1, step=-1, loss=0.0, samples_per_second=0.0)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    tmp = tmp_path_factory.mktemp("undisturbed")
    return {a: run(tmp, a, None) for a in SETTINGS}


def assert_survivors_trained_on(out: Outcome) -> None:
    assert out.survivors_kept_pid
    assert all(code == 0 for code in out.exit_codes.values()), out.exit_codes
    for slot in (0, 1, 3):
        (reports,) = out.history[slot]  # one incarnation: never restarted
        steps = [r.step for r in reports]
        assert steps == sorted(steps) and steps[-1] == STEPS, steps
        before = [r.loss for r in reports if r.step <= STOP_AT][-3:]
        assert reports[-1].loss < sum(before) / len(before)


def assert_joiner_warm_started(out: Outcome) -> None:
    _, second_life = out.history[VICTIM]
    assert second_life, "the replacement reported no progress"
    joined = second_life[0]
    assert joined.step > STOP_AT, f"the replacement started from step {joined.step}"
    initial = out.history[0][0][0].loss  # a fresh model's loss (first report)
    peers = [r.loss for r in out.history[0][0] if abs(r.step - joined.step) <= 40]
    assert joined.loss < initial / 3, (joined.loss, initial)
    assert joined.loss < max(3 * max(peers), 0.1), (joined.loss, peers)


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_sigterm_hands_off_and_a_replacement_warm_starts(tmp_path, algorithm, undisturbed):
    out = run(tmp_path, algorithm, signal.SIGTERM)
    assert out.detected_after is not None and out.detected_after < 2.0
    assert_survivors_trained_on(out)
    assert_joiner_warm_started(out)
    assert abs(out.accuracy - undisturbed[algorithm].accuracy) <= 0.01, (
        out.accuracy,
        undisturbed[algorithm].accuracy,
    )


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_sigkill_is_detected_and_the_rest_continue(tmp_path, algorithm, undisturbed):
    out = run(tmp_path, algorithm, signal.SIGKILL)
    assert out.detected_after is not None and out.detected_after < 10.0
    assert out.exit_codes[VICTIM] == 0  # the replacement's
    assert_survivors_trained_on(out)
    assert_joiner_warm_started(out)
    assert out.accuracy >= undisturbed[algorithm].accuracy - 0.02
