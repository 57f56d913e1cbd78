"""The chart's Grafana dashboard works: every query answers with real worker metrics.

A real job trains on the executing nodes; a real VictoriaMetrics server
(PromQL; built from its Go module by hack/victoriametrics/build.sh) scrapes
the workers' `metrics` ports on their loopback pod IPs, as a PodMonitor would
(adding the `namespace` label), and the operator's metrics endpoint; then
every query of the dashboard runs with the namespace and job variables set.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from dtj_devcluster import controlplane as devcluster
from dtj_operator import dashboard, render

from tests.e2e.jobs import manifest, pods
from tests.e2e.kube import ROOT, Kube, wait_for

pytestmark = pytest.mark.e2e
# Panels that may be empty in a short synchronous run without losses.
MAY_BE_EMPTY = ("Staleness (dasgd)", "Workers lost (all jobs)")


@pytest.fixture(scope="session")
def victoria_metrics() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "victoriametrics" / "build.sh")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _serve(binary: str, config: Path, data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = devcluster.free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"-httpListenAddr=127.0.0.1:{port}",
                f"-storageDataPath={data}",
                f"-promscrape.config={config}",
                "-search.latencyOffset=0s",
                "-search.disableCache",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            assert proc.poll() is None, log.read_text()[-2000:]
            return False

    wait_for("VictoriaMetrics answering", healthy, timeout=60)
    return proc, url


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def test_every_dashboard_query_answers_from_real_workers(
    kube: Kube, local, operator, operator_metrics, namespace, victoria_metrics, tmp_path
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
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "workers",
                "static_configs": [
                    {
                        "targets": [f"{ip}:{render.METRICS_PORT}" for ip in ips],
                        "labels": {"namespace": namespace},
                    }
                ],
            },
            {"job_name": "operator", "static_configs": [{"targets": [operator_target]}]},
        ],
    }
    (tmp_path / "scrape.yaml").write_text(yaml.safe_dump(config))
    proc, url = _serve(
        victoria_metrics, tmp_path / "scrape.yaml", tmp_path / "data", tmp_path / "vm.log"
    )
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
        proc.terminate()
        proc.wait(timeout=20)
        kube.run("delete", "dtj", name, "-n", namespace, "--wait=false")
    assert len(answered) >= 10, answered
