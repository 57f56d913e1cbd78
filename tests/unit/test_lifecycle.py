"""Run-policy decisions: failure vs preemption, budgets, deadlines, clean-up."""

from __future__ import annotations

import datetime as dt

from dtj_operator import api, lifecycle, render

from tests.builders import job_body

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def job(spec=None):
    return api.DecentralizedTrainingJob.from_body(job_body(spec))


def worker(slot, phase="Running", *, code=None, reason=None, disrupted=False):
    status = {"phase": phase, "conditions": []}
    if code is not None:
        status["containerStatuses"] = [{"state": {"terminated": {"exitCode": code}}}]
    if reason:
        status["reason"] = reason
    if disrupted:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True"})
    labels = {render.LABEL_COMPONENT: render.WORKER, render.LABEL_SLOT: str(slot)}
    return {"metadata": {"name": f"demo-worker-{slot}", "labels": labels}, "status": status}


def test_evictions_are_preemptions_and_exits_are_failures():
    pods = [
        worker(0, "Failed", code=1),
        worker(1, "Failed", reason="Evicted"),
        worker(2, "Failed", code=137, disrupted=True),
        worker(3),
    ]
    a = lifecycle.assess(job(), pods, {}, NOW)
    assert [p["metadata"]["name"] for p in a.failed] == ["demo-worker-0"]
    assert len(a.preempted) == 2
    assert a.phase is None
    notes = [lifecycle.preemption_note(p) for p in a.preempted]
    assert notes[0] == "demo-worker-1: evicted"
    assert notes[1].startswith("demo-worker-2: ")


def test_a_pod_its_node_rejected_at_admission_is_replaced_without_spending_backoff():
    """Issue 21: the kubelet's admission refusals (no free GPU after all, a device
    plugin error) counted as the worker's failures and spent backoffLimit."""
    pods = [
        worker(0, "Failed", reason="OutOfnvidia.com/gpu"),
        worker(1, "Failed", reason="UnexpectedAdmissionError"),
        worker(2, "Failed", code=1),
    ]
    a = lifecycle.assess(job({"runPolicy": {"backoffLimit": 0}}), pods, {}, NOW)
    assert [p["metadata"]["name"] for p in a.preempted] == ["demo-worker-0", "demo-worker-1"]
    assert [p["metadata"]["name"] for p in a.failed] == ["demo-worker-2"]
    pods[0]["status"]["message"] = "Node didn't have enough resource: nvidia.com/gpu"
    assert lifecycle.preemption_note(pods[0]) == (
        "demo-worker-0: rejected by its node (OutOfnvidia.com/gpu: Node didn't have enough "
        "resource: nvidia.com/gpu)"
    )


def test_a_worker_the_operator_released_is_no_loss_when_the_job_resumes_before_it_is_gone():
    """Issue 21: suspend then resume (or scale down then up) while the released pods
    still terminate counted each of them as a preemption."""
    pod = worker(1)
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    resumed = job({"replicas": 2})
    assert lifecycle.vanished_worker(resumed, pod, {"phase": "Running"}) == "preemptions"
    pod["metadata"]["annotations"] = {render.ANNOTATION_RELEASED: "suspended"}
    assert lifecycle.vanished_worker(resumed, pod, {"phase": "Running"}) is None


def test_backoff_limit_counts_failures_only():
    a = lifecycle.assess(
        job({"runPolicy": {"backoffLimit": 1}}),
        [worker(0, "Failed", code=2)],
        {"failures": 1, "preemptions": 50},
        NOW,
    )
    assert (a.phase, a.reason) == ("Failed", "BackoffLimitExceeded")
    assert "demo-worker-0 exited with code 2" in a.message


def test_deadline_and_completion():
    start = (NOW - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    a = lifecycle.assess(
        job({"runPolicy": {"activeDeadlineSeconds": 10}}), [worker(0)], {"startTime": start}, NOW
    )
    assert a.reason == "DeadlineExceeded"
    done = [worker(i, "Succeeded", code=0) for i in range(4)]
    assert lifecycle.assess(job(), done, {}, NOW).phase == "Succeeded"


def test_a_job_that_never_ran_times_out_from_when_it_became_active():
    """Issue 21: the deadline counted from the first Ready workers, so a job stuck
    Pending (a bad image, nowhere to schedule) never timed out. As a batch Job, it
    counts from status.activeSince: the first pass, or the last resume."""
    since = (NOW - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stuck = [worker(i, "Pending") for i in range(4)]
    spec = job({"runPolicy": {"activeDeadlineSeconds": 10}})
    a = lifecycle.assess(spec, stuck, {"activeSince": since}, NOW)
    assert a.reason == "DeadlineExceeded" and "ran 30s" in a.message
    assert lifecycle.deadline_in(spec, {"activeSince": since}, NOW) == 0.5  # look now


def test_vanished_workers():
    spec = job({"replicas": 2})
    assert lifecycle.vanished_worker(spec, worker(1), {}) == "preemptions"
    assert lifecycle.vanished_worker(spec, worker(1, "Failed", disrupted=True), {}) == "preemptions"
    assert lifecycle.vanished_worker(spec, worker(1, "Failed", code=1), {}) == "failures"
    assert lifecycle.vanished_worker(spec, worker(1, "Succeeded"), {}) is None
    assert lifecycle.vanished_worker(spec, worker(5), {}) is None, "scaled away"
    assert lifecycle.vanished_worker(spec, worker(1), {"phase": "Failed"}) is None


def test_clean_pod_policy():
    pods = [worker(0), worker(1, "Succeeded")]
    assert lifecycle.pods_to_clean(job(), pods) == ["demo-worker-0"]
    assert lifecycle.pods_to_clean(job({"runPolicy": {"cleanPodPolicy": "All"}}), pods) == [
        "demo-worker-0",
        "demo-worker-1",
    ]
    keep = job({"runPolicy": {"cleanPodPolicy": "None"}})
    assert lifecycle.pods_to_clean(keep, pods) == []
    # A failed job (DeadlineExceeded, BackoffLimitExceeded) stops what still runs (issue 21).
    assert lifecycle.pods_to_clean(keep, pods, failed=True) == ["demo-worker-0"]


def deleted(pod, *, requested: str, grace: int, finished: str, code: int):
    """`pod` as its DELETED event shows it: deletion requested at `requested`."""
    when = lifecycle.parse_time(requested) + dt.timedelta(seconds=grace)
    pod["metadata"]["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    pod["metadata"]["deletionGracePeriodSeconds"] = grace
    term = {"exitCode": code, "finishedAt": finished}
    pod["status"]["containerStatuses"] = [{"state": {"terminated": term}}]
    return pod


def test_a_worker_stopped_by_its_deletion_is_a_preemption_whatever_its_exit_code():
    spec = job()
    handed_off = deleted(
        worker(1, "Succeeded"),
        requested="2026-01-01T12:00:00Z",
        grace=30,
        finished="2026-01-01T12:00:02Z",
        code=0,
    )
    assert lifecycle.stopped_by_deletion(handed_off)
    assert lifecycle.vanished_worker(spec, handed_off, {}) == "preemptions"
    killed = deleted(
        worker(1, "Failed"),
        requested="2026-01-01T12:00:00Z",
        grace=30,
        finished="2026-01-01T12:00:30Z",
        code=137,
    )
    assert lifecycle.vanished_worker(spec, killed, {}) == "preemptions"
    # Finished (or failed) before anyone deleted it: not a loss, or a failure.
    finished = deleted(
        worker(1, "Succeeded"),
        requested="2026-01-01T12:05:00Z",
        grace=30,
        finished="2026-01-01T12:00:00Z",
        code=0,
    )
    assert not lifecycle.stopped_by_deletion(finished)
    assert lifecycle.vanished_worker(spec, finished, {}) is None
    crashed = deleted(
        worker(1, "Failed"),
        requested="2026-01-01T12:05:00Z",
        grace=30,
        finished="2026-01-01T12:00:00Z",
        code=1,
    )
    assert lifecycle.vanished_worker(spec, crashed, {}) == "failures"


def test_preemption_notes_say_why_in_words():
    gc = worker(0, "Failed", code=137)
    gc["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"}
    )
    assert lifecycle.preemption_note(gc) == "demo-worker-0: lost with its node"
    assert lifecycle.preemption_note(worker(1)) == "demo-worker-1: deleted"
    moved = lifecycle.preemption_note(worker(2), "moved away, node n1 is cordoned")
    assert moved == "demo-worker-2: moved away, node n1 is cordoned"


def test_the_deadline_clock_stops_while_suspended():
    start = (NOW - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    suspended = job({"runPolicy": {"activeDeadlineSeconds": 10, "suspend": True}})
    assert lifecycle.assess(suspended, [], {"startTime": start}, NOW).phase is None


def test_times_parse_as_the_server_and_the_client_write_them():
    server, client = "2026-11-30T09:45:18Z", "2026-11-30T09:45:18+00:00"
    assert lifecycle.parse_time(server) == lifecycle.parse_time(client)
    assert lifecycle.parse_time(server).tzinfo is not None


def ready(slot):
    pod = worker(slot)
    pod["status"]["conditions"].append({"type": "Ready", "status": "True"})
    return pod


def test_a_drain_moves_workers_within_the_jobs_own_disruption_budget():
    """Issue 21: a cordon deleted every worker of the node at once (no eviction, PDBs
    bypassed, no cap at replicas - minReplicas): a job needing 4 of 6 lost 5."""
    six = job({"replicas": 6, "minReplicas": 4})
    assert lifecycle.may_move(six, [ready(s) for s in range(6)]) == 2
    starting = [ready(s) for s in range(5)] + [worker(5, "Pending")]  # one replaced
    assert lifecycle.may_move(six, starting) == 1
    assert lifecycle.may_move(six, [ready(s) for s in range(4)]) == 0  # two gone already
    # Without minReplicas training needs them all: one at a time, so a drain ends.
    four = job({"replicas": 4})
    assert lifecycle.may_move(four, [ready(s) for s in range(4)]) == 1
    assert lifecycle.may_move(four, [ready(s) for s in range(3)] + [worker(3, "Pending")]) == 0


def test_nodes_with_minutes_left_are_urgent_and_a_cordon_is_not():
    spot = {"spec": {"taints": [{"key": "aws-node-termination-handler/spot-itn"}]}}
    cordoned = {"metadata": {"name": "n"}, "spec": {"unschedulable": True}}
    assert lifecycle.urgent(spot) and not lifecycle.urgent(cordoned)
    assert lifecycle.disruption(cordoned) == "node n is cordoned"
