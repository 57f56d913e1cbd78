"""Worker metrics follow Prometheus conventions and use the names in one place."""

from __future__ import annotations

import re

from dtj_trainer.exporter import Exporter
from dtj_trainer.metrics import METRIC_NAMES, Progress
from prometheus_client import generate_latest


def test_progress_becomes_prometheus_metrics():
    ex = Exporter(job="j", rank=3)
    ex.update(Progress(rank=3, step=10, loss=0.5, samples_per_second=100.0, bytes_sent=1000))
    ex.update(Progress(rank=3, step=20, loss=0.25, samples_per_second=120.0, bytes_sent=2500))
    text = generate_latest(ex.registry).decode()
    assert 'dtj_worker_step{job_name="j",rank="3"} 20.0' in text
    assert 'dtj_worker_sent_bytes_total{job_name="j",rank="3"} 2500.0' in text
    for name in METRIC_NAMES.values():
        assert name in text, name
        if name.endswith("_total"):
            base = name.removesuffix("_total")
            assert re.search(rf"# TYPE {base}(_total)? counter", text), name
