"""What a worker pod runs: read the rendered config, join, train, report.

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

import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .config import TrainerConfig
from .metrics import Progress

if TYPE_CHECKING:
    from .transport import Transport

DEFAULT_CONFIG_PATH = "/etc/dtj/config.json"


@dataclass(frozen=True)
class Runtime:
    """The parsed contract: config plus this worker's identity."""

    config: TrainerConfig
    rank: int
    slowdown: float = 1.0
    sample_seconds: float = 0.0
    speed_hint: float = 1.0


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
    sample_seconds = float(env.get("DTJ_SIMULATE_SAMPLE_SECONDS", "0"))
    if sample_seconds < 0:
        raise SystemExit(f"DTJ_SIMULATE_SAMPLE_SECONDS={sample_seconds} must be >= 0")
    hint = float(env.get("DTJ_SPEED_HINT", "1"))
    if hint <= 0:
        raise SystemExit(f"DTJ_SPEED_HINT={hint} must be > 0")
    return Runtime(config, rank, slowdown, sample_seconds, hint)


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


def say(message: str) -> None:
    print(f"dtj-trainer: {message}", flush=True)


def run(rt: Runtime) -> int:
    """Join the job's membership, train through generation changes, report.

    SIGTERM (preemption, scale-down, pod deletion) makes the worker hand its
    model to the members and exit 0 within the grace period; it writes no result.
    """
    # The push receiver is a Python thread: let it in often, so pushes do not
    # queue up behind a fast training loop (default switch interval is 5 ms).
    sys.setswitchinterval(0.0002)
    cfg = rt.config
    # torch only once the contract is valid
    from .loop import AlreadyDone, Elastic, Left, Worker, patiently
    from .membership import Generation, Member
    from .storelink import StoreLink
    from .transport import DistTransport, Unconnected, connect_store

    pod_ip = os.environ.get("DTJ_POD_IP") or None
    backend = backend_for(cfg.backend)

    def reach() -> Any:
        return connect_store(cfg.store_host, cfg.store_port, timeout=cfg.timeout_seconds)

    # Two connections (the heartbeat thread has its own); both follow a replaced
    # coordinator, and the heartbeat's registers this worker with it again.
    store, beat_store = StoreLink(reach), StoreLink(reach)
    holder: dict[str, Worker] = {}

    def on_newer(g: int) -> None:  # from the heartbeat thread
        worker = holder.get("worker")
        if worker is None or worker.elastic is None or g <= worker.elastic.generation.number:
            return
        worker.elastic.changed.set()
        if getattr(worker.transport, "generation", g) < g:
            worker.transport.abandon()  # wakes the main thread if it waits on the old one

    def connect(gen: Generation, rank: int) -> DistTransport:
        return DistTransport(
            store.store,
            generation=gen.number,
            rank=rank,
            size=len(gen.members),
            backend=backend,
            timeout=cfg.timeout_seconds,
            host=pod_ip,
        )

    member = Member(store, beat_store, rt.rank, on_newer)

    def on_reconnect() -> None:  # a new coordinator: register again, restore the counters
        member.rejoin()
        if (worker := holder.get("worker")) is not None:
            worker.reseed(beat_store)

    beat_store.on_reconnect = on_reconnect
    elastic = Elastic(member, store, connect, Generation(-1, ()), cfg.timeout_seconds, say)

    exporter = None
    if port := env_int("DTJ_METRICS_PORT"):
        from .exporter import Exporter

        exporter = Exporter(job=cfg.job, rank=rt.rank)
        exporter.serve(port, pod_ip or "0.0.0.0")

    def report(p: Progress) -> None:
        if exporter:
            exporter.update(p)
        line = json.dumps(asdict(p))
        print(line, flush=True)
        member.post(f"progress/{rt.rank}", line)  # sent by the heartbeat thread

    try:
        # Not connected yet: train() joins the first generation.
        unconnected = cast("Transport", Unconnected())
        worker = Worker.build(
            cfg,
            unconnected,
            slowdown=rt.slowdown,
            slot=rt.rank,
            elastic=elastic,
            sample_seconds=rt.sample_seconds,
            hint=rt.speed_hint,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(e) from e
    holder["worker"] = worker
    # Register only now, ready to train: members that admit us wait for no data loading.
    member.join()
    say(f"joined as {member.id}; waiting for a generation")
    signal.signal(signal.SIGTERM, lambda *_: elastic.leaving.set())
    try:
        result = asyncio.run(worker.train(report))
    except Left:
        member.stop()
        return 0
    except AlreadyDone:
        if worker.current_step == 0:
            say("the job's training had already finished when this worker joined: nothing to do")
        else:
            say(
                f"the job's training finished while this worker was away (it had reached "
                f"step {worker.current_step}); the others' result stands"
            )
        member.leave()
        return 0
    line = json.dumps(asdict(result))
    patiently(lambda: store.set(f"result/{rt.rank}", line), elastic, "this worker's result")
    print(line, flush=True)
    member.leave()  # done: the others need not wait for this worker any more
    worker.transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
