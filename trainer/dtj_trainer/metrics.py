"""What each worker measures, and the names it exports them under.

One module owns the metric names (the Grafana dashboard test checks that it
only queries names defined here). Counters are plain Python so that the
training loop and the simulator can use them without a metrics server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

# Prometheus names (base units; counters end in _total and only go up, so rate()
# gives throughput: samples/s is rate(dtj_worker_samples_total), not a gauge).
METRIC_NAMES = {
    "steps": "dtj_worker_steps_total",
    "samples": "dtj_worker_samples_total",
    "loss": "dtj_worker_loss",
    "consensus_distance": "dtj_worker_consensus_distance",
    "bytes_sent": "dtj_worker_sent_bytes_total",
    "bytes_received": "dtj_worker_received_bytes_total",
    "comm_wait_seconds": "dtj_worker_communication_wait_seconds_total",
    "data_wait_seconds": "dtj_worker_data_wait_seconds_total",
    "epoch": "dtj_worker_data_epoch",
    "staleness": "dtj_worker_staleness_updates",
    "dropped": "dtj_worker_dropped_updates_total",
    "batch": "dtj_worker_batch_samples",
    "compute_samples_per_second": "dtj_worker_compute_samples_per_second",
    "generation": "dtj_worker_membership_generation",
    "members": "dtj_worker_membership_members",
    # A user's loop: each number it reports with job.report(), labelled by its name.
    "reported": "dtj_worker_reported_value",
}
# Staleness (in updates) of each gradient a dasgd worker received.
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class CommCounters:
    """Bytes on the wire and seconds blocked waiting for peers."""

    bytes_sent: int = 0
    bytes_received: int = 0
    wait_seconds: float = 0.0

    def add(self, *, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wait_seconds += time.perf_counter() - t0


@dataclass
class Progress:
    """One worker's report at a step: what the launcher prints and the status shows."""

    rank: int
    step: int
    loss: float
    samples_per_second: float
    test_accuracy: float | None = None
    consensus_distance: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    comm_wait_seconds: float = 0.0
    data_wait_seconds: float = 0.0  # reading and collating batches (the loop waits for data)
    epoch: int | None = None  # the data ledger's epoch of this worker's last batch
    staleness: float | None = None
    time: float | None = None  # unix seconds of the report
    batch: int | None = None  # local batch size (dynamic batching moves it)
    compute_samples_per_second: float | None = None  # measured speed, waiting excluded
    job_samples: int | None = None  # samples of all workers together (budgeted jobs)
    # Counters of this process (they only go up; a replacement starts again at 0).
    rounds: int = 0  # rounds run
    samples: int = 0  # samples trained on
    dropped: int = 0  # received updates dropped as too stale (dasgd)
    stale: list[int] | None = None  # staleness of each update received since the last report
    generation: int | None = None  # membership generation (elastic jobs)
    members: int | None = None  # members of that generation
    metrics: dict[str, float] | None = None  # a user's loop: its own numbers (job.report)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Result:
    """How training ended, as seen by one worker."""

    steps: int
    # Test accuracy on the built-in data set (None for a user's loop: see metrics).
    worker_accuracy: float | None
    averaged_accuracy: float | None
    consensus_distance: float
    seconds: float
    active_nodes: int | None = None  # teleportation's k (found by the search when 'auto')
    samples_per_second: float = 0.0  # this worker's throughput over the training rounds
    # dasgd: staleness (in updates) of the gradients this worker received, over the run
    staleness_mean: float | None = None
    staleness_max: int | None = None
    updates_received: int = 0
    updates_dropped: int = 0
    metrics: dict[str, float] | None = None  # a user's loop: its last job.report()


@dataclass
class StalenessTally:
    """Running totals of received updates' staleness (dasgd), for the final Result."""

    count: int = 0
    total: int = 0
    max: int | None = None
    dropped: int = 0

    def add(self, stale: tuple[int, ...], dropped: int) -> None:
        self.count += len(stale)
        self.total += sum(stale)
        if stale:
            self.max = max(stale) if self.max is None else max(self.max, *stale)
        self.dropped += dropped

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None
