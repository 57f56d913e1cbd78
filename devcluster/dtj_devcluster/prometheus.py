"""A real Prometheus server on loopback, for the dashboard test and bench.

Built from its Go module by hack/prometheus/build.sh (pinned, cached); it
scrapes static targets (the workers' loopback pod IPs, the operator) as the
chart's PodMonitors would, and answers PromQL over its HTTP API.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .controlplane import ROOT, free_port


def binary() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "prometheus" / "build.sh")], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"building Prometheus failed: {out.stderr[-2000:]}")
    return out.stdout.strip()


def scrape_config(workers: list[str], operator: str | None, namespace: str) -> str:
    """Scrape every second: `workers` (host:port) labelled with their namespace."""
    jobs: list[dict[str, Any]] = [
        {
            "job_name": "workers",
            "static_configs": [{"targets": sorted(workers), "labels": {"namespace": namespace}}],
        }
    ]
    if operator:
        jobs.append({"job_name": "operator", "static_configs": [{"targets": [operator]}]})
    return yaml.safe_dump(
        {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": jobs}
    )


class Prometheus:
    """One Prometheus process; `reload()` after rewriting its config (SIGHUP)."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def reload(self) -> None:
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
