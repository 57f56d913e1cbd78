"""A worker process's place in its job: the coordinator's store, its membership, its reports.

Both ways of training open one: the built-in trainer (`python -m dtj_trainer`)
and a user's own loop (`dtj_trainer.init()`). It connects to the job's
coordinator (following it when it is replaced), registers the worker once it
is ready to train, sends progress to the store, stdout and the metrics
endpoint, turns SIGTERM into a hand-off, and at the end writes the result.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

from .elastic import COORDINATOR_PATIENCE, AlreadyDone, Elastic, Left, patiently, reseed
from .entrypoint import Runtime, env_int, say
from .loop import Worker
from .membership import Generation, Member
from .metrics import Progress, Result
from .storelink import StoreLink
from .transport import DistTransport, Transport, Unconnected, connect_store


@dataclass
class Session:
    """The job as one worker process sees it (one per process)."""

    rt: Runtime
    store: StoreLink
    member: Member
    elastic: Elastic
    exporter: Any = None
    worker: Worker | None = None

    def report(self, p: Progress) -> None:
        if self.exporter:
            self.exporter.update(p)
        line = json.dumps(asdict(p))
        print(line, flush=True)
        self.member.post(f"progress/{self.rt.rank}", line)  # sent by the heartbeat thread

    def unconnected(self) -> Transport:
        """The transport of a worker not in a generation yet (train() joins one)."""
        return cast("Transport", Unconnected())

    def start(self, worker: Worker) -> None:
        """Register the worker, ready to train: members that admit it wait for no data
        loading. SIGTERM from here on means: hand the model off and stop."""
        self.worker = worker
        self.member.join()
        say(f"joined as {self.member.id}; waiting for a generation")
        signal.signal(signal.SIGTERM, lambda *_: self.elastic.leaving.set())

    def conclude(self, outcome: Result | BaseException) -> Result | None:
        """After train(): write the result (or say why there is none) and leave the
        membership; re-raises an error that is not a way of ending."""
        worker, member = self.worker, self.member
        assert worker is not None
        if isinstance(outcome, Left):
            member.stop()
            return None
        if isinstance(outcome, AlreadyDone):
            if worker.current_step == 0:
                say("the job had already finished training when this worker joined: nothing to do")
            else:
                say(
                    f"the job's training finished while this worker was away (it had reached "
                    f"step {worker.current_step}); the others' result stands"
                )
            member.leave()
            return None
        if isinstance(outcome, BaseException):
            raise outcome
        line = json.dumps(asdict(outcome))
        patiently(
            lambda: self.store.set(f"result/{self.rt.rank}", line), self.elastic, "this result"
        )
        print(line, flush=True)
        worker.local.sampler.hand_back()  # what it leased and did not train stays the job's
        member.leave()  # done: the others need not wait for this worker any more
        worker.transport.close()
        return outcome


def open_session(rt: Runtime, backend: str) -> Session:
    """Connect to the job's coordinator and prepare the membership (not joined yet)."""
    cfg = rt.config
    pod_ip = os.environ.get("DTJ_POD_IP") or None

    def reach() -> Any:
        return connect_store(cfg.store_host, cfg.store_port, timeout=cfg.timeout_seconds)

    def first_reach() -> Any:
        """A worker may start while its coordinator is being replaced (or still
        starting): it waits for it as the running workers do, saying so."""
        patience = COORDINATOR_PATIENCE * cfg.timeout_seconds
        deadline, told = time.monotonic() + patience, False
        while True:
            try:
                return reach()
            except RuntimeError as e:  # DistNetworkError: nobody listens there yet
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the job's coordinator ({cfg.store_host}:{cfg.store_port}) has not "
                        f"answered for {patience:.0f}s: {str(e).splitlines()[0][:200]}"
                    ) from e
                if not told:
                    say(
                        f"the job's coordinator ({cfg.store_host}:{cfg.store_port}) does not "
                        "answer yet (starting, or being replaced): waiting for it"
                    )
                    told = True
                time.sleep(1.0)

    # Two connections (the heartbeat thread has its own); both follow a replaced
    # coordinator, and the heartbeat's registers this worker with it again.
    store = StoreLink(reach, store=first_reach())
    beat_store = StoreLink(reach, store=first_reach())

    def on_newer(g: int) -> None:  # from the heartbeat thread
        worker = session.worker
        if worker is None or g <= elastic.generation.number:
            return
        elastic.changed.set()
        if getattr(worker.transport, "generation", g) < g:
            worker.transport.abandon()  # wakes the training thread if it waits on the old one

    def connect(gen: Generation, rank: int) -> DistTransport:
        return DistTransport(
            store.store,
            generation=gen.number,
            rank=rank,
            size=len(gen.members),
            backend=backend,
            timeout=cfg.timeout_seconds,
            host=pod_ip,
        )

    member = Member(store, beat_store, rt.rank, on_newer)

    def on_reconnect() -> None:  # a new coordinator: register again, restore the counters
        member.rejoin()
        if (worker := session.worker) is not None:
            reseed(worker, beat_store)

    beat_store.on_reconnect = on_reconnect
    elastic = Elastic(member, store, connect, Generation(-1, ()), cfg.timeout_seconds, say)
    exporter = None
    if port := env_int("DTJ_METRICS_PORT"):
        from .exporter import Exporter

        exporter = Exporter(job=cfg.job, rank=rt.rank)
        exporter.serve(port, pod_ip or "0.0.0.0")
    session = Session(rt, store, member, elastic, exporter)
    return session
