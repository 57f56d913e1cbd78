"""Worker metrics follow Prometheus conventions and use the names in one place."""

from __future__ import annotations

import re

from dtj_trainer.exporter import Exporter
from dtj_trainer.metrics import METRIC_NAMES, Progress
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _progress(**kw) -> Progress:
    return Progress(rank=3, step=kw.pop("step", 0), loss=0.5, samples_per_second=0.0, **kw)


def test_progress_becomes_prometheus_metrics():
    ex = Exporter(job="j", rank=3)
    ex.update(_progress(step=10, rounds=10, samples=320, bytes_sent=1000, stale=[0, 3]))
    ex.update(
        _progress(
            step=20,
            rounds=20,
            samples=640,
            bytes_sent=2500,
            stale=[40],
            dropped=1,
            metrics={"val_loss": 2.5},
        )
    )
    text = generate_latest(ex.registry).decode()
    assert 'dtj_worker_reported_value{job_name="j",name="val_loss",rank="3"} 2.5' in text
    assert 'dtj_worker_steps_total{job_name="j",rank="3"} 20.0' in text
    assert 'dtj_worker_samples_total{job_name="j",rank="3"} 640.0' in text
    assert 'dtj_worker_sent_bytes_total{job_name="j",rank="3"} 2500.0' in text
    assert 'dtj_worker_dropped_updates_total{job_name="j",rank="3"} 1.0' in text
    assert 'dtj_worker_staleness_updates_count{job_name="j",rank="3"} 3.0' in text
    assert 'dtj_worker_staleness_updates_bucket{job_name="j",le="4.0",rank="3"} 2.0' in text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES.values():
        assert name in text, name
        base = name.removesuffix("_total")
        if name.endswith("_total"):
            assert types[base] == "counter", name
            assert re.search(rf"# TYPE {base}(_total)? counter", text), name
        else:  # gauges and histograms never claim to be counters
            assert types[base] in ("gauge", "histogram"), name
    assert "samples_per_second" not in "".join(
        n for n in METRIC_NAMES.values() if n != METRIC_NAMES["compute_samples_per_second"]
    ), "throughput is rate() of a counter, not a gauge"


def test_a_new_process_starts_its_counters_again_without_going_back():
    ex = Exporter(job="j", rank=0)
    ex.update(_progress(rounds=50, samples=1600))
    ex.update(_progress(rounds=5, samples=160))  # counters of a restarted loop
    ex.update(_progress(rounds=10, samples=320))
    text = generate_latest(ex.registry).decode()
    assert 'dtj_worker_steps_total{job_name="j",rank="0"} 55.0' in text
