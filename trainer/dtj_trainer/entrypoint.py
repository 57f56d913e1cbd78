"""What a worker pod runs (the built-in trainer, or the user's script through
dtj_trainer.init()): the contract it reads, and how a bad spec ends it.

The contract with the operator (rendered by dtj_operator.render):
  DTJ_CONFIG  path of the TrainerConfig JSON (the job's ConfigMap, mounted)
  DTJ_RANK    this worker's slot, 0..replicas-1
  DTJ_POD_IP  optional address to listen on (gloo, metrics): the pod's IP, from
              the downward API; several pods may share a node's loopback
  DTJ_METRICS_PORT  optional port for Prometheus metrics (on DTJ_POD_IP, else 0.0.0.0)
  DTJ_SPEED_HINT  optional relative speed of this worker's node pool (the
              pool's `speed`): the dynamic batch plan's starting point
  Benchmark and test knobs, not product settings:
  DTJ_SIMULATE_SAMPLE_SECONDS  modelled compute seconds per sample, slept in
              each local step before the worker communicates (GPU-like steps)
  DTJ_SIMULATE_SLOWDOWN  factor >= 1 on all of this worker's compute (real and
              modelled, never its waiting): a 3 is hardware 3x slower
Progress and the final result go to the coordinator store (keys
`progress/<rank>` and `result/<rank>`, JSON) and to stdout as JSON lines.
A spec the trainer cannot run (unknown model or data set, a factory that does
not import) ends the process with exit code 2 and one line on stderr saying
what to change: the operator shows it as the failure's message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainerConfig
from .emulation import Emulation

DEFAULT_CONFIG_PATH = "/etc/dtj/config.json"


@dataclass(frozen=True)
class Runtime:
    """The parsed contract: config plus this worker's identity."""

    config: TrainerConfig
    rank: int
    speed_hint: float = 1.0
    emulation: Emulation = field(default_factory=Emulation)  # benchmarks and tests


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
    hint = float(env.get("DTJ_SPEED_HINT", "1"))
    if hint <= 0:
        raise SystemExit(f"DTJ_SPEED_HINT={hint} must be > 0")
    return Runtime(config, rank, hint, Emulation.from_env(env))


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


CONFIG_ERROR = 2


def main() -> int:
    """The built-in trainer (builtin.py); a spec it cannot run exits with CONFIG_ERROR."""
    from .builtin import main as train  # torch only once the command runs

    try:
        train()
    except ConfigError as e:
        print(f"dtj-trainer: error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR
    return 0


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


def say(message: str) -> None:
    print(f"dtj-trainer: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
