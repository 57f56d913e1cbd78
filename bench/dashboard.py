"""What the chart's Grafana dashboard shows for a real run, drawn without Grafana.

A job of 4 workers trains on the local cluster's executing nodes under the
operator; a real Prometheus (built from its Go module) scrapes
the workers' `metrics` ports and the operator's endpoint every second, as the
chart's PodMonitors would. Midway one worker is preempted (its pod deleted):
membership and the operator's loss counter move, the replacement joins. Then
every panel's queries run over the whole run (range queries, the dashboard's
variables set) and are drawn with matplotlib.

    .venv/bin/python bench/dashboard.py   # writes bench/results/dashboard.{png,json}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from dtj_devcluster import controlplane, prometheus
from dtj_operator import dashboard, render
from dtj_operator.cli import operator_command

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
NAME = "dashboard"


def job() -> dict[str, Any]:
    return {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": NAME, "namespace": "default"},
        "spec": {
            "replicas": 4,
            "minReplicas": 2,
            "algorithm": {"name": "dpsgd", "topology": "one-peer-exponential"},
            "optimizer": {"lr": 0.1, "momentum": 0.9},
            "batching": {"perWorker": 32, "dynamic": True},
            "training": {"steps": 100000, "evalEvery": 10},
            "template": {"env": [{"name": "DTJ_SIMULATE_SAMPLE_SECONDS", "value": "0.002"}]},
        },
    }


def wait(what: str, probe: Any, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


def workers(cluster: controlplane.LocalCluster) -> dict[str, tuple[str, str]]:
    """Running workers' pod name -> (uid, pod IP)."""
    pods = json.loads(cluster.kubectl("get", "pods", "-o", "json").stdout)["items"]
    return {
        p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["podIP"])
        for p in pods
        if p["metadata"]["labels"].get(render.LABEL_COMPONENT) == render.WORKER
        and p["status"].get("phase") == "Running"
        and p["status"].get("podIP")
        and not p["metadata"].get("deletionTimestamp")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="training before and after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtj-dashboard-") as tmp:
        work = Path(tmp)
        cluster = controlplane.LocalCluster(work / "cluster", controlplane.build())
        print("starting the local cluster (2 executing nodes) ...", flush=True)
        cluster.start(fake_nodes=False)
        procs: list[subprocess.Popen[bytes]] = []
        server: prometheus.Prometheus | None = None
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
            cluster.kubectl(
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/decentralizedtrainingjobs.training.dtj.io",
            )
            port = controlplane.free_port()
            env = {
                "KUBECONFIG": str(cluster.kubeconfig),
                "PATH": "/usr/bin:/bin",
                "DTJ_OPERATOR_METRICS_PORT": str(port),
                "DTJ_OPERATOR_METRICS_ADDR": "127.0.0.1",
            }
            with open(work / "operator.log", "wb") as out:
                procs.append(
                    subprocess.Popen(
                        operator_command("default"), stdout=out, stderr=subprocess.STDOUT, env=env
                    )
                )
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(job()))
            ips = wait("4 running workers", lambda: len(workers(cluster)) == 4 and workers(cluster))
            config = work / "scrape.yaml"
            operator = f"127.0.0.1:{port}"

            def targets(pods: dict[str, tuple[str, str]]) -> list[str]:
                return [f"{ip}:{render.METRICS_PORT}" for _, ip in pods.values()]

            config.write_text(prometheus.scrape_config(targets(ips), operator, "default"))
            server = prometheus.Prometheus(config, work)
            url = server.url
            start = time.time()
            print(f"4 workers training, scraped every second; {args.seconds:.0f} s", flush=True)
            time.sleep(args.seconds)
            victim = sorted(ips)[1]
            print(f"preempting {victim} (kubectl delete pod)", flush=True)
            cluster.kubectl("delete", "pod", victim, "--wait=false")
            preempted = time.time() - start
            after = wait(
                "the replacement running",
                lambda: len(w := workers(cluster)) == 4 and w[victim][0] != ips[victim][0] and w,
            )
            config.write_text(prometheus.scrape_config(targets(after), operator, "default"))
            server.reload()
            print(f"replacement running; {args.seconds:.0f} s more", flush=True)
            time.sleep(args.seconds)
            end = time.time()
            variables = {"namespace": "default", "job": NAME, "__rate_interval": "10s"}
            RESULTS.mkdir(exist_ok=True)
            drawn = dashboard.snapshot(url, variables, start, end, RESULTS / "dashboard.png")
            report = {
                "job": job()["spec"],
                "seconds": round(end - start, 1),
                "preempted_at_seconds": round(preempted, 1),
                "series_per_panel": drawn,
                "queries": [
                    {"panel": t, "expr": dashboard.expand(e, variables)}
                    for t, e, _ in dashboard.queries()
                ],
            }
            (RESULTS / "dashboard.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(drawn, indent=2))
            print(f"wrote {RESULTS / 'dashboard.png'} and dashboard.json", flush=True)
        finally:
            if server is not None:
                server.stop()
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=30)
            print("cleaning up the local cluster", flush=True)
            cluster.stop()


if __name__ == "__main__":
    main()
