"""Prometheus exposition of a worker's measurements (names from dtj_trainer.metrics).

The pod serves them on DTJ_METRICS_PORT (rendered by the operator); the
chart's ServiceMonitor/scrape config and the Grafana dashboard read them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .metrics import METRIC_NAMES, STALENESS_BUCKETS, Progress


class Exporter:
    """A worker's metrics, updated from its progress reports."""

    def __init__(self, *, job: str, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = {"job_name": job, "rank": str(rank)}
        names = list(labels)

        def gauge(key: str, doc: str) -> Gauge:
            return Gauge(METRIC_NAMES[key], doc, names, registry=self.registry).labels(**labels)

        def counter(key: str, doc: str) -> Counter:
            name = METRIC_NAMES[key].removesuffix("_total")
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        self.steps = counter("steps", "Training rounds run by this worker process.")
        self.samples = counter("samples", "Training samples this worker process trained on.")
        self.loss = gauge("loss", "Mean training loss over the last report window.")
        self.consensus = gauge("consensus_distance", "(1/n) sum ||x_i - x_bar||^2.")
        self.staleness = Histogram(
            METRIC_NAMES["staleness"],
            "Staleness of each received gradient, in updates (dasgd).",
            names,
            buckets=STALENESS_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.dropped = counter("dropped", "Received gradients dropped as too stale (dasgd).")
        self.batch = gauge("batch", "Local batch size (dynamic batching moves it).")
        self.speed = gauge(
            "compute_samples_per_second", "Measured compute throughput, waiting excluded."
        )
        self.generation = gauge("generation", "Membership generation this worker trains in.")
        self.members = gauge("members", "Workers in this worker's membership generation.")
        self.sent = counter("bytes_sent", "Bytes sent to peers.")
        self.received = counter("bytes_received", "Bytes received from peers.")
        self.wait = counter("comm_wait_seconds", "Seconds blocked waiting for peers.")
        self.data_wait = counter(
            "data_wait_seconds", "Seconds spent reading and collating training batches."
        )
        self.epoch = gauge("epoch", "The data ledger's epoch of this worker's last batch.")
        self.reported = Gauge(
            METRIC_NAMES["reported"],
            "A number the user's training loop reported (job.report), by name.",
            [*names, "name"],
            registry=self.registry,
        )
        self._labels = labels
        self._last = Progress(rank=rank, step=0, loss=0.0, samples_per_second=0.0)

    def update(self, p: Progress) -> None:
        last = self._last
        self.steps.inc(max(0, p.rounds - last.rounds))
        self.samples.inc(max(0, p.samples - last.samples))
        self.dropped.inc(max(0, p.dropped - last.dropped))
        self.loss.set(p.loss)
        for value in p.stale or ():
            self.staleness.observe(value)
        if p.consensus_distance is not None:
            self.consensus.set(p.consensus_distance)
        if p.batch is not None:
            self.batch.set(p.batch)
        if p.compute_samples_per_second is not None:
            self.speed.set(p.compute_samples_per_second)
        if p.generation is not None:
            self.generation.set(p.generation)
        if p.members is not None:
            self.members.set(p.members)
        for name, number in (p.metrics or {}).items():
            self.reported.labels(**self._labels, name=name).set(number)
        self.sent.inc(max(0, p.bytes_sent - last.bytes_sent))
        self.received.inc(max(0, p.bytes_received - last.bytes_received))
        self.wait.inc(max(0.0, p.comm_wait_seconds - last.comm_wait_seconds))
        self.data_wait.inc(max(0.0, p.data_wait_seconds - last.data_wait_seconds))
        if p.epoch is not None:
            self.epoch.set(p.epoch)
        self._last = p

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
