"""The job's coordinator: a small, stable store every worker rendezvous through.

It holds a torch.distributed TCPStore on a non-preemptible endpoint (its own
pod on a cluster, the launcher process locally). Workers come and go; the
store, and with it the job's membership and progress, stays.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from . import progress
from .config import TrainerConfig
from .entrypoint import DEFAULT_CONFIG_PATH


def serve(host: str, port: int) -> dist.TCPStore:
    """Start the store server; port 0 picks a free port (read it back from `.port`)."""
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
        use_libuv=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=29400)
    parser.add_argument(
        "--report-status",
        action="store_true",
        help="write the workers' aggregated progress to the job's status (in a pod)",
    )
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    store = serve(args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"coordinator store listening on {args.host}:{store.port}", flush=True)
    if args.report_status:
        cfg = TrainerConfig.model_validate_json(
            Path(os.environ.get("DTJ_CONFIG", DEFAULT_CONFIG_PATH)).read_text()
        )
        writer = progress.StatusWriter.in_cluster(os.environ["DTJ_NAMESPACE"], cfg.job)
        report_loop(store, cfg.replicas, writer, stop, args.interval)
    stop.wait()
    return 0


def report_loop(
    store: dist.Store,
    replicas: int,
    writer: progress.StatusWriter,
    stop: threading.Event,
    interval: float,
) -> None:
    """Every `interval` seconds, write new progress to the job status until stopped."""
    last: int | None = None
    while not stop.wait(interval):
        reports = progress.read_reports(store, replicas)
        summary = progress.aggregate(reports)
        if summary and summary["step"] != last:
            try:
                writer.write(summary)
                last = summary["step"]
            except OSError as e:  # the API server may be briefly away: try next time
                print(f"could not write progress to the job status: {e}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
