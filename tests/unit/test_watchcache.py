"""The operator's cache: projections, expectations, the coalescing work queue."""

from __future__ import annotations

import asyncio

from dtj_operator import observed
from dtj_operator.reconcile import EXPECTATION_SECONDS, Pass
from dtj_operator.watchcache import WatchCache, stale
from dtj_operator.workqueue import WorkQueue

KEY = ("ns", "job")


def _pod(name: str, uid: str, **meta: object) -> dict:
    return {"metadata": {"name": name, "uid": uid, "namespace": "ns", **meta}, "status": {}}


def _job(rv: str, phase: str = "Pending") -> dict:
    return {
        "metadata": {"name": "job", "namespace": "ns", "uid": "j", "resourceVersion": rv},
        "spec": {},
        "status": {"phase": phase},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(job: dict, pods: list[dict]) -> tuple[WatchCache, Clock]:
    clock = Clock()
    c = WatchCache(children_indexes=("configmaps",), clock=clock)
    c.attach(jobs={KEY: [job]}, pods={KEY: pods}, configmaps={})
    return c, clock


def test_a_pod_projection_ignores_heartbeats_but_not_what_reconcile_reads():
    pod = {
        "metadata": {"name": "w", "uid": "u", "resourceVersion": "1", "managedFields": [{}]},
        "spec": {"nodeName": "n", "containers": [{"image": "x"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": "t1"}],
            "containerStatuses": [{"state": {"running": {"startedAt": "t"}}}],
        },
    }
    probed = {**pod, "metadata": {**pod["metadata"], "resourceVersion": "2"}}
    probed["status"] = {**pod["status"], "conditions": [{"type": "Ready", "status": "True"}]}
    assert observed.pod(pod) == observed.pod(probed)
    failed = {**pod, "status": {**pod["status"], "phase": "Failed"}}
    assert observed.pod(pod) != observed.pod(failed)
    assert "managedFields" not in observed.pod(pod)["metadata"]


def test_the_trainer_progress_is_not_a_reason_for_a_pass_unless_it_pauses():
    job = _job("1") | {"status": {"phase": "Running", "progress": {"step": 10, "members": 4}}}
    later = job | {"status": {"phase": "Running", "progress": {"step": 20, "members": 4}}}
    paused = job | {"status": {"phase": "Running", "progress": {"step": 20, "paused": True}}}
    assert observed.job(job) == observed.job(later)
    assert observed.job(job) != observed.job(paused)


def test_a_created_pod_counts_as_existing_until_the_cache_shows_it():
    c, _ = cache(_job("1"), [])
    obs = c.snapshot(KEY)
    c.remember(KEY, obs, Pass(created={"job-worker-0"}))
    assert c.snapshot(KEY).created == {"job-worker-0"}
    c.indexes["pods"] = {KEY: [_pod("job-worker-0", "u0")]}
    assert c.snapshot(KEY).created == set()


def test_an_expectation_lapses_so_a_lost_create_is_retried():
    c, clock = cache(_job("1"), [])
    c.remember(KEY, c.snapshot(KEY), Pass(created={"job-worker-0"}))
    clock.now += EXPECTATION_SECONDS + 1
    assert c.snapshot(KEY).created == set()


def test_a_deleted_pod_is_remembered_until_the_cache_shows_it_going():
    c, _ = cache(_job("1"), [_pod("w", "u1")])
    c.remember(KEY, c.snapshot(KEY), Pass(deleted={"u1"}))
    assert c.snapshot(KEY).deleting == {"u1"}
    c.indexes["pods"] = {KEY: [_pod("w", "u1", deletionTimestamp="t")]}
    assert c.snapshot(KEY).deleting == set()


def test_the_status_just_written_wins_until_the_watch_delivers_it():
    c, _ = cache(_job("1"), [])
    obs = c.snapshot(KEY)
    c.remember(KEY, obs, Pass(written=_job("2", "Running")))
    assert c.snapshot(KEY).body["status"]["phase"] == "Running"  # cache still at "1"
    c.indexes["jobs"] = {KEY: [_job("3", "Succeeded")]}  # the watch moved on
    assert c.snapshot(KEY).body["status"]["phase"] == "Succeeded"


def test_a_gone_job_has_no_snapshot():
    c, _ = cache(_job("1"), [])
    c.indexes["jobs"] = {}
    assert c.snapshot(KEY) is None


def test_the_queue_merges_a_burst_and_never_runs_a_job_twice_at_once():
    runs: list[str] = []
    running: set[str] = set()

    async def run(key: str) -> None:
        assert key not in running
        running.add(key)
        runs.append(key)
        await asyncio.sleep(0.05)
        running.discard(key)

    async def main() -> None:
        q = WorkQueue(run, settle=0.02)
        for _ in range(10):
            q.kick("a")
        q.kick("b")
        await asyncio.sleep(0.03)
        q.kick("a")  # while "a" runs: one more pass after it
        q.kick("a")
        while q.busy():
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sorted(runs) == ["a", "a", "b"]


def test_a_pass_that_asks_to_run_later_runs_later_and_the_earliest_ask_wins():
    times: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def run(key: str) -> float | None:
            times.append(loop.time() - t0)
            return 0.2 if len(times) == 1 else None

        q = WorkQueue(run, settle=0.0)
        q.kick("a")
        await asyncio.sleep(0.05)
        q.later("a", 5.0)  # a later ask does not postpone the earlier one
        await asyncio.sleep(0.4)

    asyncio.run(main())
    assert len(times) == 2 and 0.15 <= times[1] - times[0] < 1.0, times


def test_a_failing_pass_is_retried():
    calls = 0

    async def main() -> None:
        async def run(key: str) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("API down")

        q = WorkQueue(run, settle=0.0)
        q.kick("a")
        await asyncio.sleep(0.05)
        assert "a" in q._timers  # the retry is scheduled, not lost

    asyncio.run(main())
    assert calls == 1


def test_a_resync_hides_pods_deleted_in_a_watch_gap_and_only_those():
    """Issue 21: after a 410 Gone kopf relists but keeps what the relist lacks: a pod
    deleted in the gap stayed indexed, its name taken, its slot never refilled."""
    a, b = _pod("job-worker-0", "a"), _pod("job-worker-1", "b")
    c, _ = cache(_job("1"), [a, b])
    before = c.indexed_pods()
    late = _pod("job-worker-2", "c")  # created after the index was read, not yet listed
    c.indexes["pods"][KEY].append(late)
    assert c.purge(before, listed={"a"}) == {KEY}  # b went during the gap
    assert [p["metadata"]["uid"] for p in c.snapshot(KEY).pods] == ["a", "c"]
    # Once kopf drops b itself, the cache forgets it: what it hides stays bounded.
    c.indexes["pods"][KEY].remove(b)
    assert c.purge(c.indexed_pods(), listed={"a", "c"}) == set()
    assert c._gone == set()


def test_stale_is_what_was_indexed_before_the_listing_and_missing_from_it():
    indexed = {("ns", "x"): {"1", "2"}, ("ns", "y"): {"3"}}
    assert stale(indexed, {"1", "3", "9"}) == {("ns", "x"): {"2"}}
    assert stale(indexed, {"1", "2", "3"}) == {}
