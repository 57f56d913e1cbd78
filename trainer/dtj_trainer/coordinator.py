"""The job's coordinator: a small, stable store every worker rendezvous through.

It holds a torch.distributed TCPStore on a non-preemptible endpoint (its own
pod on a cluster, the launcher process locally). Workers come and go; the
store, and with it the job's membership and progress, stays.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import ledger, membership, progress
from .config import TrainerConfig
from .entrypoint import DEFAULT_CONFIG_PATH


def serve(host: str, port: int) -> dist.TCPStore:
    """Start the store server on `host` (an address, or 0.0.0.0 for all); port 0
    picks a free port (read it back from `.port`).

    TCPStore itself listens on every interface; to listen on the pod's own IP
    only (several pods may share a node's loopback, as in the local cluster)
    we bind the socket and hand it over.
    """
    listen_fd = None
    if host not in ("", "0.0.0.0"):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        port = sock.getsockname()[1]
        listen_fd = sock.detach()  # the store owns it from here
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
        master_listen_fd=listen_fd,
        use_libuv=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--host",
        default=os.environ.get("DTJ_POD_IP") or "0.0.0.0",
        help="address to listen on (default: DTJ_POD_IP, the pod's IP, else all)",
    )
    parser.add_argument("--port", type=int, default=29400)
    parser.add_argument(
        "--report-status",
        action="store_true",
        help="write the workers' aggregated progress to the job's status (in a pod)",
    )
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    cfg = TrainerConfig.model_validate_json(
        Path(os.environ.get("DTJ_CONFIG", DEFAULT_CONFIG_PATH)).read_text()
    )
    store = serve(args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    say(f"store listening on {args.host}:{store.port}")
    authority = start_registrar(cfg, args.host, store.port, stop)
    if args.report_status:
        writer = progress.StatusWriter.in_cluster(os.environ["DTJ_NAMESPACE"], cfg.job)
        report_loop(store, authority.registrar, writer, stop, args.interval)
    stop.wait()
    say("stopping")
    authority.halt(stop)
    return 0


def say(message: str) -> None:
    print(f"dtj-coordinator: {message}", flush=True)


@dataclass(frozen=True)
class Authority:
    """The job's registrar and its ledger service, each on a thread of its own."""

    registrar: membership.Registrar
    threads: tuple[threading.Thread, ...]

    def halt(self, stop: threading.Event, timeout: float = 5.0) -> None:
        """Stop both threads and wait for them: a daemon thread still inside a store call
        while the interpreter exits aborts the process ("terminate called without an
        active exception": its C++ frames are torn down under it)."""
        stop.set()
        for thread in self.threads:
            thread.join(timeout)


def start_registrar(cfg: TrainerConfig, host: str, port: int, stop: threading.Event) -> Authority:
    """The job's membership authority and ledger, on store connections of their own."""
    from .transport import connect_store

    client = connect_store(
        "127.0.0.1" if host in ("", "0.0.0.0") else host, port, timeout=cfg.timeout_seconds
    )
    registrar = membership.Registrar(
        client, min_members=cfg.min_replicas or cfg.replicas, expected=cfg.replicas, log=say
    )
    registrar.on_removed = lambda m: ledger.submit(client, {"op": "drop", "m": m})
    threads = [
        threading.Thread(target=registrar.run, args=(stop,), name="dtj-registrar", daemon=True)
    ]
    book = ledger.Service(
        connect_store(
            "127.0.0.1" if host in ("", "0.0.0.0") else host, port, timeout=cfg.timeout_seconds
        ),
        members=lambda: list(registrar.members),
        log=say,
    )
    threads.append(threading.Thread(target=book.run, args=(stop,), name="dtj-ledger", daemon=True))
    for thread in threads:
        thread.start()
    return Authority(registrar, tuple(threads))


def follow_spec(writer: progress.StatusWriter, registrar: membership.Registrar) -> None:
    """Keep the registrar's sizes in line with the job's spec: `kubectl scale` (or an
    HPA) changes replicas, and a job without minReplicas trains with all of them."""
    try:
        spec = writer.read_spec()
    except OSError as e:  # the API server may be briefly away: next time
        say(f"could not read the job's spec: {e}")
        return
    if "replicas" not in spec:
        return
    replicas = int(spec["replicas"])
    registrar.resize(min_members=int(spec.get("minReplicas") or replicas), expected=replicas)


def report_loop(
    store: dist.Store,
    registrar: membership.Registrar,
    writer: progress.StatusWriter,
    stop: threading.Event,
    interval: float,
) -> None:
    """Every `interval` seconds, write new progress (with the generation and its live
    members) to the job status, and the result once workers finish. A last pass
    runs when stopped, so a result that lands just before the pod is deleted is kept."""
    written: dict[str, Any] = {}
    stopping = False
    while not stopping:
        stopping = stop.wait(interval)
        follow_spec(writer, registrar)
        update: dict[str, Any] = {}
        live = sorted({membership.slot_of(m) for m in registrar.members})
        summary = progress.aggregate(progress.read_reports(store, live))
        if summary or registrar.generation >= 0:
            summary["generation"] = registrar.generation
            summary["members"] = len(registrar.members)
            summary["paused"] = registrar.paused
            keys = ("step", "generation", "members", "paused")
            if any(summary.get(k) != written.get("progress", {}).get(k) for k in keys):
                update["progress"] = summary
        everyone = sorted({membership.slot_of(m) for m in registrar.ever})
        result = progress.summarize_results(progress.read_results(store, everyone))
        if result and result != written.get("result"):
            update["result"] = result
        if not update:
            continue
        try:
            writer.write(update)
            written.update(update)
        except OSError as e:  # the API server may be briefly away: try next time
            say(f"could not write progress to the job status: {e}")


if __name__ == "__main__":
    raise SystemExit(main())
