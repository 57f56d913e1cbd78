"""The job's coordinator: a small, stable store every worker rendezvous through.

It holds a torch.distributed TCPStore on a non-preemptible endpoint (its own
pod on a cluster, the launcher process locally). Workers come and go; the
store, and with it the job's membership and progress, stays.
"""

from __future__ import annotations

import argparse
import signal
import threading
from datetime import timedelta

import torch.distributed as dist


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
    args = parser.parse_args(argv)
    store = serve(args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"coordinator store listening on {args.host}:{store.port}", flush=True)
    stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
