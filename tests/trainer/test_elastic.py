"""Workers leave and join a running job; nobody else restarts (4 real processes).

Each run trains 4 workers through the local coordinator (store + registrar).
Mid-run, slot 2's worker gets SIGTERM (it hands its model off and leaves) and
a replacement starts; while that one is on its way, slot 3's worker gets
SIGKILL (its heartbeat stops) and a replacement starts. Compared with an
undisturbed run of the same seed. minReplicas is 4, so training waits for each
replacement however long it takes to start. Steps take modelled compute (a
sleep: it changes how long a step takes, never what it computes), as on real
hardware rather than a tiny model's ~1 ms.
"""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dtj_trainer import membership
from dtj_trainer.config import TrainerConfig
from dtj_trainer.launcher import LocalJob
from dtj_trainer.metrics import Progress

from tests.trainer.waiting import wait

pytestmark = pytest.mark.procs

SETTINGS = {
    "dpsgd": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
    # near its plateau by the end (as tuned in bench/), so one lost model costs < 1 point
    "gosgd": {"optimizer": {"lr": 0.3}},
    "allreduce": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
    "dasgd": {"optimizer": {"lr": 0.1, "momentum": 0.9}},  # gradients scaled by 1/n
    "teleportation": {"optimizer": {"lr": 0.1}, "algorithm": {"activeNodes": 2}},
}
STEPS = 600


def config(algorithm: str, min_replicas: int = 2) -> TrainerConfig:
    settings = SETTINGS[algorithm]
    return TrainerConfig.model_validate(
        {
            "job": f"elastic-{algorithm}",
            "replicas": 4,
            "minReplicas": min_replicas,
            "algorithm": {"name": algorithm, **settings.get("algorithm", {})},
            "optimizer": settings["optimizer"],
            "training": {"steps": STEPS, "evalEvery": 20},
            "timeoutSeconds": 10,  # a generation broken while forming is retried sooner
        }
    )


@dataclass
class Outcome:
    accuracy: float
    detected_after: dict[int, float]  # signal -> seconds until a generation without it
    history: dict[int, list[list[Progress]]]  # slot -> per incarnation -> reports
    warm_starts: dict[int, list[int]]  # slot -> the step each warm start began at
    job_step: dict[int, int]  # victim's slot -> the least step its peers had reported then
    exit_codes: dict[int, int]
    survivors_kept_pid: bool


def history(logs: Path, slot: int) -> list[list[Progress]]:
    """A worker's progress reports from its log, one list per incarnation."""
    out: list[list[Progress]] = []
    for line in (logs / f"worker-{slot}.log").read_text().splitlines():
        if "joined as" in line:
            out.append([])
        elif line.startswith('{"rank"'):
            out[-1].append(Progress(**json.loads(line)))
    return out


def warm_starts(logs: Path, slot: int) -> list[int]:
    """The steps a worker's incarnations warm-started at (from its log)."""
    text = (logs / f"worker-{slot}.log").read_text()
    return [int(m) for m in re.findall(r"warm start from the members' .* at step (\d+)", text)]


@dataclass
class Event:
    slot: int
    sig: int
    at_step: int


EVENTS = [Event(2, signal.SIGTERM, 100), Event(3, signal.SIGKILL, 120)]
SAMPLE_SECONDS = "0.0015"  # modelled compute per sample: ~48 ms a step of 32
# The leave-and-join runs wait for their replacements (minReplicas 4): ~16 ms a step.
JOIN_SAMPLE_SECONDS = "0.0005"


def run(tmp_path: Path, algorithm: str, events: list[Event]) -> Outcome:
    """Train; for each event stop that slot's worker, then start its replacement.

    minReplicas is 4 here: a generation short of a worker pauses until its replacement
    joins, so the replacement always trains however long it takes to start (a
    fixed-length job raced it on a loaded machine). Training on short-handed is the
    e2e tests' and the frozen-worker test's."""
    logs = tmp_path / algorithm
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": JOIN_SAMPLE_SECONDS} for s in range(4)}
    job = LocalJob(config(algorithm, min_replicas=4), logs=logs, extra_env=env)
    try:
        for slot in range(4):
            job.start_worker(slot)
        pids = {s: p.pid for s, p in job.procs.items()}
        detected: dict[int, float] = {}
        job_step: dict[int, int] = {}
        for ev in events:
            # The victim's member id, read before the signal (a leaver is gone at once).
            victim = wait(
                f"slot {ev.slot} at step {ev.at_step}, training",
                lambda ev=ev: (
                    job.reports().get(ev.slot, _none).step >= ev.at_step
                    and next(
                        (m for m in job.generation().members if m.startswith(f"{ev.slot}.")),
                        None,
                    )
                ),
            )
            t0 = time.monotonic()
            job.signal(ev.slot, ev.sig)
            job_step[ev.slot] = min(r.step for s, r in job.reports().items() if s != ev.slot)
            wait(
                "a generation without the victim",
                lambda v=victim: v not in job.generation().members,
            )
            detected[ev.sig] = time.monotonic() - t0
            job.start_worker(ev.slot)  # the replacement, as soon as the slot is free
        wait("the end of training", lambda: not job.running(), timeout=300)
        codes = {s: p.returncode for s, p in job.procs.items()}
        stopped = {ev.slot for ev in events}
        kept = all(job.procs[s].pid == pids[s] for s in range(4) if s not in stopped)
        return Outcome(
            job.result().averaged_accuracy,
            detected,
            {s: history(logs, s) for s in range(4)},
            {s: warm_starts(logs, s) for s in range(4)},
            job_step,
            codes,
            kept,
        )
    finally:
        job.close()


_empty = membership.Generation(-1, ())
_none = Progress(rank=-1, step=-1, loss=0.0, samples_per_second=0.0)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    tmp = tmp_path_factory.mktemp("undisturbed")
    return {a: run(tmp, a, []) for a in SETTINGS}


def assert_survivors_trained_on(out: Outcome, survivors: list[int], stop_at: int) -> None:
    assert out.survivors_kept_pid
    assert all(code == 0 for code in out.exit_codes.values()), out.exit_codes
    for slot in survivors:
        (reports,) = out.history[slot]  # one incarnation: never restarted
        steps = [r.step for r in reports]
        assert steps == sorted(steps) and steps[-1] == STEPS, steps
        before = [r.loss for r in reports if r.step <= stop_at][-3:]
        assert reports[-1].loss < sum(before) / len(before)


def assert_joiner_warm_started(out: Outcome, slot: int) -> None:
    """The replacement starts where the job is (the members' step: synchronous methods
    their latest, asynchronous ones their mean), never at step 0, on a trained model."""
    _, second_life = out.history[slot]
    assert second_life, f"the replacement of slot {slot} reported no progress"
    (start,) = out.warm_starts[slot]  # the first incarnation started cold
    assert start >= out.job_step[slot] > 0, (start, out.job_step[slot])
    joined = second_life[0]
    assert joined.step >= start
    cold = out.history[0][0][0].loss  # a fresh model after its first 20 steps
    peers = [r.loss for r in out.history[0][0] if abs(r.step - joined.step) <= 40]
    # Close to the peers (its first window: a fresh optimizer on the averaged model),
    # far from a cold start.
    assert joined.loss < cold / 2, (joined.loss, cold)
    assert joined.loss < max(6 * max(peers), 0.3), (joined.loss, peers)


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_workers_leave_and_die_and_replacements_warm_start(tmp_path, algorithm, undisturbed):
    out = run(tmp_path, algorithm, EVENTS)
    assert out.detected_after[signal.SIGTERM] < 2.0, out.detected_after
    assert out.detected_after[signal.SIGKILL] < 10.0, out.detected_after
    assert_survivors_trained_on(out, [0, 1], EVENTS[0].at_step)
    assert_joiner_warm_started(out, 2)
    assert_joiner_warm_started(out, 3)
    # Losing two workers costs little (a different trajectory may also gain): at most a
    # point and a half; runs of one seed whose events fall at other steps under load
    # spread that much (gosgd: 0.976 against 0.987 undisturbed, on a loaded CI machine).
    assert out.accuracy >= undisturbed[algorithm].accuracy - 0.015, (
        out.accuracy,
        undisturbed[algorithm].accuracy,
    )


def test_a_frozen_worker_is_dropped_and_asks_back_in_when_it_thaws(tmp_path, undisturbed):
    """SIGSTOP (a stalled node, a paused VM): nobody waits for it past the heartbeat
    bound; on SIGCONT it finds itself dropped, rejoins and trains to the end."""
    logs = tmp_path / "frozen"
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": SAMPLE_SECONDS} for s in range(4)}
    job = LocalJob(config("dpsgd"), logs=logs, extra_env=env)
    try:
        for slot in range(4):
            job.start_worker(slot)
        pids = {s: p.pid for s, p in job.procs.items()}
        wait(
            "step 100 in a full generation",
            lambda: job.reports().get(1, _none).step >= 100 and len(job.generation().members) == 4,
        )
        frozen = next(m for m in job.generation().members if m.startswith("1."))
        t0 = time.monotonic()
        job.signal(1, signal.SIGSTOP)
        wait(
            "a generation without the frozen worker", lambda: frozen not in job.generation().members
        )
        detected = time.monotonic() - t0
        step = job.reports()[0].step
        wait("the others to train on", lambda: job.reports()[0].step >= step + 40)
        job.signal(1, signal.SIGCONT)
        wait(
            "the thawed worker back in",
            lambda: frozen in job.generation().members and len(job.generation().members) == 4,
        )
        wait("the end of training", lambda: not job.running(), timeout=300)
        assert detected < 10.0, detected
        assert {s: p.returncode for s, p in job.procs.items()} == dict.fromkeys(range(4), 0)
        assert {s: p.pid for s, p in job.procs.items()} == pids  # nobody restarted
        assert "dropped this worker" in (logs / "worker-1.log").read_text()
        accuracy = job.result().averaged_accuracy
        assert abs(accuracy - undisturbed["dpsgd"].accuracy) <= 0.01
    finally:
        job.close()


def test_a_worker_lost_before_its_first_generation_forms_does_not_stall_the_others(tmp_path):
    """Slot 3 registers, is admitted to generation 0 and dies before it forms. The others
    give generation 0 up as soon as the registrar publishes one without it, instead of
    waiting in gloo's connection set-up for the whole collective timeout (here 10 min)."""
    cfg = config("dpsgd").model_copy(update={"timeout_seconds": 600.0})
    logs = tmp_path / "lost-while-forming"
    job = LocalJob(cfg, logs=logs)
    try:
        for slot in range(3):
            job.start_worker(slot)

        def joined(slot: int) -> bool:
            if not job.store.check([membership.REQUESTS]):
                return False
            return f'"join": "{slot}.' in job.store.get(membership.REQUESTS).decode()

        wait("slots 0-2 registered", lambda: all(joined(s) for s in range(3)))
        job.start_worker(3)
        wait("slot 3 registered", lambda: joined(3), timeout=60)
        job.signal(3, signal.SIGSTOP)  # before generation 0 exists: it never gets to form it
        wait("generation 0 with all four", lambda: len((job.generation() or _empty).members) == 4)
        job.signal(3, signal.SIGKILL)
        wait("the end of training", lambda: not job.running(), timeout=300)
        assert {s: job.procs[s].returncode for s in range(3)} == dict.fromkeys(range(3), 0)
        for slot in range(3):
            log = (logs / f"worker-{slot}.log").read_text()
            assert re.search(r"generation 0 (was )?given up", log), log
            assert "broke while forming" not in log, log
            (reports,) = history(logs, slot)
            assert reports[-1].step == STEPS
        assert job.result().averaged_accuracy > 0.9
    finally:
        job.close()


def test_a_step_counted_asynchronous_run_with_a_slow_worker_ends_without_a_regroup(tmp_path):
    """Issue 18, finding 8: the fast workers finished their steps first and waited for
    the slow one in drain()'s all-reduce, which timed out (timeoutSeconds 4), broke the
    generation and forced an unplanned regroup (or exited 1). They now wait on the
    store, which has no timeout to break, and end together."""
    cfg = config("gosgd").model_copy(update={"timeout_seconds": 4.0})
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": 150})})
    env = {str(s): {"DTJ_SIMULATE_SAMPLE_SECONDS": SAMPLE_SECONDS} for s in range(4)}
    env["3"]["DTJ_SIMULATE_SLOWDOWN"] = "3"  # ~14 s behind the others at the end
    logs = tmp_path / "slow-async"
    job = LocalJob(cfg, logs=logs, extra_env=env)
    try:
        for slot in range(4):
            job.start_worker(slot)
        wait("the end of training", lambda: not job.running(), timeout=300)
        assert {s: p.returncode for s, p in job.procs.items()} == dict.fromkeys(range(4), 0)
        for slot in range(4):
            log = (logs / f"worker-{slot}.log").read_text()
            assert "regrouping" not in log and "generation 1:" not in log, log[-2000:]
        assert len(job.results()) == 4
    finally:
        job.close()


def test_repeated_preemptions_of_a_large_model_leave_no_hand_off_in_the_store(tmp_path):
    """Issue 18, finding 9: every leaver wrote its full fp32 model into the coordinator's
    store and nothing deleted it (400 MB per preemption for a 100M-parameter model).
    A ~40 MB model, preempted three times: each hand-off is deleted once the members
    have taken it, so the store holds none at the end and never more than one."""
    cfg = TrainerConfig.model_validate(
        {
            "job": "handoffs",
            "replicas": 2,
            "minReplicas": 2,  # each replacement is waited for: every hand-off is taken
            "algorithm": {"name": "dpsgd"},
            "optimizer": {"lr": 0.01},
            "training": {"steps": 100_000, "evalEvery": 5, "model": "wide:build"},
            "timeoutSeconds": 30,
        }
    )
    path = str(Path(__file__).parent / "factories")
    env = {str(s): {"PYTHONPATH": path} for s in range(2)}
    job = LocalJob(cfg, logs=tmp_path / "handoffs", extra_env=env)
    try:
        for slot in range(2):
            job.start_worker(slot)
        gone: list[str] = []
        for _ in range(3):
            gen = wait(
                "both workers training",
                lambda: (g := job.generation()) and len(g.members) == 2 and not g.paused and g,
                timeout=180,
            )
            leaver = next(m for m in gen.members if m.startswith("1."))
            wait("a report from slot 1", lambda: job.reports().get(1, _none).step > 0, 180)
            job.signal(1, signal.SIGTERM)
            wait("slot 1 gone", lambda who=leaver: who not in job.generation().members)
            gone.append(leaver)
            job.start_worker(1)
            wait(
                "the replacement in",
                lambda who=leaver: (
                    (g := job.generation()) and len(g.members) == 2 and who not in g.members
                ),
                timeout=180,
            )
            wait(
                "the hand-off taken and deleted",
                lambda who=leaver: not job.store.check([f"handoff/{who}"]),
                timeout=120,
            )
            held = [m for m in gone if job.store.check([f"handoff/{m}"])]
            assert held == [], held
    finally:
        job.close()
