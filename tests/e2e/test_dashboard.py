"""The chart's Grafana dashboard works: every query answers with real worker metrics.

A real job trains on the executing nodes; a real Prometheus (built from its Go
module by hack/prometheus/build.sh) scrapes the workers' `metrics` ports on
their loopback pod IPs, as a PodMonitor would (adding the `namespace` label),
and the operator's metrics endpoint; then every query of the dashboard runs
with the namespace and job variables set, and the panels are drawn to a PNG
from range queries (what bench/dashboard.py writes to bench/results/).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from dtj_devcluster import prometheus
from dtj_operator import dashboard, render

from tests.e2e.jobs import manifest, pods
from tests.e2e.kube import Kube, wait_for

pytestmark = pytest.mark.e2e
# Panels that may be empty in a short synchronous run without losses.
MAY_BE_EMPTY = ("Staleness (dasgd)", "Workers lost (all jobs)")


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def test_every_dashboard_query_answers_from_real_workers(
    kube: Kube, local, operator, operator_metrics, namespace, tmp_path
):
    name = "dash"
    body = manifest(
        name,
        replicas=3,
        batching={"dynamic": True},
        training={"steps": 100000, "evalEvery": 5},
        template={"env": [{"name": "DTJ_SIMULATE_SAMPLE_SECONDS", "value": "0.001"}]},
    )
    kube.run("apply", "-n", namespace, "-f", "-", input=body)

    def worker_ips() -> list[str] | None:
        ws = [
            p
            for p in pods(kube, namespace, name).values()
            if p["metadata"]["labels"].get(render.LABEL_COMPONENT) == render.WORKER
            and p["status"].get("phase") == "Running"
            and p["status"].get("podIP")
        ]
        return [p["status"]["podIP"] for p in ws] if len(ws) == 3 else None

    ips = wait_for("3 running workers with pod IPs", worker_ips, timeout=120)
    operator_target = operator_metrics.split("//")[1].split("/")[0]
    targets = [f"{ip}:{render.METRICS_PORT}" for ip in ips]
    (tmp_path / "scrape.yaml").write_text(
        prometheus.scrape_config(targets, operator_target, namespace)
    )
    server = prometheus.Prometheus(tmp_path / "scrape.yaml", tmp_path)
    url = server.url
    try:
        selected = {"namespace": namespace, "job": name, "__rate_interval": "20s"}
        start = time.time()

        def expand(expr: str) -> str:
            return dashboard.expand(expr, selected)

        # Training for a while, scraped every second: rates need a few samples.
        wait_for(
            "scraped training progress",
            lambda: any(
                float(r["value"][1]) > 0
                for r in _query(url, expand(f"rate({dashboard._m('samples')}{dashboard.SEL}[20s])"))
            ),
            timeout=120,
        )
        time.sleep(5)
        answered = {}
        for title, expr, _ in dashboard.queries():
            result = _query(url, expand(expr))
            answered.setdefault(title, []).append(len(result))
            if title not in MAY_BE_EMPTY:
                assert result, f"panel {title!r} shows nothing: {expand(expr)}"
        per_worker = _query(url, expand(f"rate({dashboard._m('samples')}{dashboard.SEL}[20s])"))
        assert {r["metric"]["rank"] for r in per_worker} == {"0", "1", "2"}
        assert {r["metric"]["job_name"] for r in per_worker} == {name}
        # The PNG rendering bench/dashboard.py writes, from the same range queries.
        png = tmp_path / "dashboard.png"
        drawn = dashboard.snapshot(url, selected, start, time.time(), png, step=1.0)
        assert png.stat().st_size > 10_000
        assert drawn["Throughput per worker"] == 3, drawn
        assert all(drawn[t] for t in answered if t not in MAY_BE_EMPTY), drawn
    finally:
        server.stop()
        kube.run("delete", "dtj", name, "-n", namespace, "--wait=false")
    assert len(answered) >= 10, answered
