"""What a worker pod runs: read the rendered config, join, train, report.

The contract with the operator (rendered by dtj_operator.render):
  DTJ_CONFIG  path of the TrainerConfig JSON (the job's ConfigMap, mounted)
  DTJ_RANK    this worker's slot, 0..replicas-1
  DTJ_POD_IP  optional address to listen on (gloo, metrics): the pod's IP, from
              the downward API; several pods may share a node's loopback
  DTJ_METRICS_PORT  optional port for Prometheus metrics (on DTJ_POD_IP, else 0.0.0.0)
  DTJ_SIMULATE_SLOWDOWN  optional factor > 1 that makes this worker that much
              slower (emulates older hardware in demos and benchmarks)
Progress and the final result go to the coordinator store (keys
`progress/<rank>` and `result/<rank>`, JSON) and to stdout as JSON lines.
A spec the trainer cannot run (unknown model or data set, a factory that does
not import) ends the process with exit code 2 and one line on stderr saying
what to change: the operator shows it as the failure's message.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import TrainerConfig
from .metrics import Progress

DEFAULT_CONFIG_PATH = "/etc/dtj/config.json"


@dataclass(frozen=True)
class Runtime:
    """The parsed contract: config plus this worker's identity."""

    config: TrainerConfig
    rank: int
    slowdown: float = 1.0


def load_runtime(env: Mapping[str, str]) -> Runtime:
    """Parse the environment the operator (or the local launcher) gives a worker."""
    path = Path(env.get("DTJ_CONFIG", DEFAULT_CONFIG_PATH))
    if not path.is_file():
        raise SystemExit(f"trainer config not found at {path}: set DTJ_CONFIG or mount it there")
    config = TrainerConfig.model_validate_json(path.read_text())
    try:
        rank = int(env["DTJ_RANK"])
    except (KeyError, ValueError):
        raise SystemExit("DTJ_RANK must be set to this worker's slot (0..replicas-1)") from None
    if not 0 <= rank < config.replicas:
        raise SystemExit(f"DTJ_RANK={rank} is outside 0..{config.replicas - 1}")
    slowdown = float(env.get("DTJ_SIMULATE_SLOWDOWN", "1"))
    if slowdown < 1:
        raise SystemExit(f"DTJ_SIMULATE_SLOWDOWN={slowdown} must be >= 1")
    return Runtime(config, rank, slowdown)


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


CONFIG_ERROR = 2


def main() -> int:
    try:
        return run(load_runtime(os.environ))
    except ConfigError as e:
        print(f"dtj-trainer: error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR


class ConfigError(Exception):
    """The job's spec asks for something this trainer cannot do."""


def backend_for(requested: str) -> str:
    """nccl needs a visible CUDA device; without one the worker says so and uses gloo."""
    import torch

    if requested == "nccl" and not torch.cuda.is_available():
        print(
            "dtj-trainer: warning: the job requests GPUs (nccl) but no CUDA device is "
            "visible in this container; training on the CPU with gloo",
            file=sys.stderr,
            flush=True,
        )
        return "gloo"
    return requested


def run(rt: Runtime) -> int:
    # The push receiver is a Python thread: let it in often, so pushes do not
    # queue up behind a fast training loop (default switch interval is 5 ms).
    sys.setswitchinterval(0.0002)
    cfg = rt.config
    from .loop import Worker  # torch is imported only once the contract is valid
    from .transport import DistTransport, connect_store

    pod_ip = os.environ.get("DTJ_POD_IP") or None
    store = connect_store(cfg.store_host, cfg.store_port, timeout=cfg.timeout_seconds)
    transport = DistTransport(
        store,
        generation=0,
        rank=rt.rank,
        size=cfg.replicas,
        backend=backend_for(cfg.backend),
        timeout=cfg.timeout_seconds,
        host=pod_ip,
    )

    exporter = None
    if port := env_int("DTJ_METRICS_PORT"):
        from .exporter import Exporter

        exporter = Exporter(job=cfg.job, rank=rt.rank)
        exporter.serve(port, pod_ip or "0.0.0.0")

    def report(p: Progress) -> None:
        if exporter:
            exporter.update(p)
        line = json.dumps(asdict(p))
        store.set(f"progress/{rt.rank}", line)
        print(line, flush=True)

    try:
        worker = Worker.build(cfg, transport, slowdown=rt.slowdown)
    except (ValueError, TypeError) as e:
        raise ConfigError(e) from e
    result = asyncio.run(worker.train(report))
    line = json.dumps(asdict(result))
    store.set(f"result/{rt.rank}", line)
    print(line, flush=True)
    transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
