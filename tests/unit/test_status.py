"""Status is a pure function of the job and its observed pods."""

from __future__ import annotations

from dtj_operator import api, render, status

from tests.builders import job_body


def pod(slot, phase="Running", ready=True, component="worker"):
    return {
        "metadata": {
            "name": f"demo-{component}-{slot}",
            "labels": {render.LABEL_COMPONENT: component, render.LABEL_JOB: "demo"},
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def compute(spec, pods, old=None):
    body = job_body(spec)
    if old:
        body["status"] = old
    return status.compute(api.DecentralizedTrainingJob.from_body(body), body, pods)


def cond(st, type_):
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_all_ready_is_running():
    st = compute({"replicas": 2}, [pod(0), pod(1), pod(0, component="coordinator")])
    assert st["phase"] == "Running" and st["readyReplicas"] == 2 and st["replicas"] == 2
    assert cond(st, "Running")["status"] == "True"
    assert st["selector"] == "training.dtj.io/job=demo,app.kubernetes.io/component=worker"


def test_pending_workers_are_counted_and_min_replicas_starts_training():
    pods = [pod(0), pod(1), pod(2, phase="Pending", ready=False)]
    st = compute({"replicas": 3}, pods)
    assert st["phase"] == "Pending" and st["pendingReplicas"] == 1
    assert cond(st, "Running")["reason"] == "WaitingForWorkers"
    st = compute({"replicas": 3, "minReplicas": 2}, pods)
    assert st["phase"] == "Running"


def test_unchanged_condition_keeps_its_transition_time():
    first = compute({"replicas": 1}, [pod(0)])
    t = cond(first, "Running")["lastTransitionTime"]
    cond(first, "Running")["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    again = compute({"replicas": 1}, [pod(0)], old=first)
    assert cond(again, "Running")["lastTransitionTime"] == "2000-01-01T00:00:00Z" != t
    assert not status.differs(again, {k: again[k] for k in ("phase", "readyReplicas")})


def test_creation_problems_show_as_a_false_created_condition():
    st = status.compute(
        api.DecentralizedTrainingJob.from_body(job_body({"replicas": 1})),
        job_body({"replicas": 1}),
        [],
        problems=["cannot create Pod demo-worker-0: Forbidden (403)"],
    )
    created = cond(st, "Created")
    assert created["status"] == "False" and created["reason"] == "CreateFailed"
    assert "Forbidden" in created["message"]


def test_workers_that_finished_first_keep_the_job_running_while_the_rest_finish():
    pods = [pod(0, "Succeeded", ready=False), pod(1, "Succeeded", ready=False), pod(2), pod(3)]
    st = compute({"replicas": 4, "minReplicas": 3}, pods)
    assert st["phase"] == "Running"
    assert cond(st, "Degraded")["status"] == "False"
    # Really short of workers: a worker missing is not one that finished.
    st = compute({"replicas": 4, "minReplicas": 3}, [pod(0, "Succeeded", ready=False), pod(2)])
    assert st["phase"] == "Pending"


def test_degraded_says_which_worker_was_lost_and_why():
    old = {"lastPreemption": "demo-worker-2: evicted (a drain or the eviction API)"}
    st = compute({"replicas": 3, "minReplicas": 2}, [pod(0), pod(1)], old=old)
    degraded = cond(st, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "WorkersMissing"
    assert "2/3 workers ready" in degraded["message"]
    assert "demo-worker-2: evicted" in degraded["message"]
    full = compute({"replicas": 2}, [pod(0), pod(1)], old=old)
    assert cond(full, "Degraded")["status"] == "False"


def test_training_paused_below_min_replicas_is_degraded():
    old = {"progress": {"members": 1, "generation": 4, "paused": True}}
    st = compute({"replicas": 3, "minReplicas": 2}, [pod(0), pod(1), pod(2)], old=old)
    degraded = cond(st, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "TrainingPaused"
    assert "1 live workers, fewer than minReplicas" in degraded["message"]
    old["progress"]["paused"] = False
    st = compute({"replicas": 3, "minReplicas": 2}, [pod(0), pod(1), pod(2)], old=old)
    assert cond(st, "Degraded")["status"] == "False"


def test_suspending_clears_the_start_time_and_resuming_sets_it_anew():
    started = {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}
    suspended = compute({"replicas": 2, "runPolicy": {"suspend": True}}, [], started)
    assert "startTime" in suspended and suspended["startTime"] is None  # a merge patch deletes it
    assert status.differs(started, suspended)
    resumed = compute({"replicas": 2}, [pod(0), pod(1)], {"phase": "Suspended"})
    assert resumed["startTime"] and resumed["startTime"] != started["startTime"]
    still = compute({"replicas": 2, "runPolicy": {"suspend": True}}, [], {"phase": "Suspended"})
    assert "startTime" not in still  # nothing to clear: no write


def test_the_deadline_clock_starts_at_the_first_pass_and_restarts_on_resume():
    pending = compute({"replicas": 2}, [pod(0, "Pending", False), pod(1, "Pending", False)])
    assert pending["phase"] == "Pending" and pending["activeSince"]  # ticking already
    assert "startTime" not in pending  # no worker has trained yet
    kept = compute({"replicas": 2}, [pod(0), pod(1)], {"activeSince": "2026-01-01T00:00:00Z"})
    assert "activeSince" not in kept  # unchanged: no write
    older = compute({"replicas": 2}, [pod(0)], {"startTime": "2026-01-01T00:00:00Z"})
    assert older["activeSince"] == "2026-01-01T00:00:00Z"  # a job an older operator started
    paused = compute(
        {"replicas": 2, "runPolicy": {"suspend": True}}, [], {"activeSince": "2026-01-01T00:00:00Z"}
    )
    assert "activeSince" in paused and paused["activeSince"] is None


def test_phase_changes_and_degradation_become_events():
    running = compute({"replicas": 2}, [pod(0), pod(1)])
    (event,) = status.transitions({"phase": "Pending"}, running)
    assert event[:2] == ("Normal", "Running") and "2/2 workers ready" in event[2]
    assert status.transitions(running, running) == []  # no change, no event
    short = compute({"replicas": 2, "minReplicas": 1}, [pod(0)], running)
    assert ("Warning", "Degraded") in [e[:2] for e in status.transitions(running, short)]
    failed = {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True",
              "reason": "DeadlineExceeded", "message": "ran 30s"}]}  # fmt: skip
    assert status.transitions(running, failed) == [("Warning", "DeadlineExceeded", "ran 30s")]


def test_a_started_job_short_of_min_replicas_stays_running_and_degraded():
    started = {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}
    st = compute({"replicas": 4, "minReplicas": 3}, [pod(0), pod(1), pod(2, "Pending")], started)
    assert st["phase"] == "Running"
    assert cond(st, "Running")["status"] == "False"
    degraded = cond(st, "Degraded")
    assert degraded["status"] == "True" and "fewer than minReplicas 3" in degraded["message"]
    never = compute({"replicas": 4, "minReplicas": 3}, [pod(0), pod(1)])
    assert never["phase"] == "Pending"  # not started yet: waiting, not degraded


def test_a_failed_pass_turns_reconciled_false_and_the_next_good_pass_true_again():
    body = job_body({"replicas": 1})
    st = compute({"replicas": 1}, [pod(0)])
    assert cond(st, "Reconciled")["status"] == "True"
    body["status"] = {**st, **status.failed_pass({**body, "status": st}, "etcd timed out")}
    failed = cond(body["status"], "Reconciled")
    assert (failed["status"], failed["reason"], failed["message"]) == (
        "False",
        "ReconcileFailed",
        "etcd timed out",
    )
    assert cond(body["status"], "Running") == cond(st, "Running")  # the rest untouched
    again = compute({"replicas": 1}, [pod(0)], old=body["status"])
    assert cond(again, "Reconciled")["status"] == "True"
