"""Modelled hardware, for benchmarks and tests: never a setting of a job.

A worker's compute can be made to take longer than it does on this machine (a
slower GPU generation; GPU-like step times on a CPU, where communication is
small next to compute) by sleeping after the real compute, before the worker
communicates: it changes how long a step takes, never what it computes. The
launcher, the simulator and the benchmarks set it through a worker's
environment (DTJ_SIMULATE_SAMPLE_SECONDS, DTJ_SIMULATE_SLOWDOWN); a job's spec
cannot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Emulation:
    sample_seconds: float = 0.0  # modelled compute per sample on a speed-1 worker
    slowdown: float = 1.0  # factor >= 1 on all of this worker's compute, real and modelled

    def extra_seconds(self, real: float, batch: int) -> float:
        """What to sleep after `real` seconds of compute on a batch of `batch`."""
        return (self.slowdown - 1) * real + self.sample_seconds * self.slowdown * batch

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Emulation:
        slowdown = float(env.get("DTJ_SIMULATE_SLOWDOWN", "1"))
        if slowdown < 1:
            raise SystemExit(f"DTJ_SIMULATE_SLOWDOWN={slowdown} must be >= 1")
        sample_seconds = float(env.get("DTJ_SIMULATE_SAMPLE_SECONDS", "0"))
        if sample_seconds < 0:
            raise SystemExit(f"DTJ_SIMULATE_SAMPLE_SECONDS={sample_seconds} must be >= 0")
        return cls(sample_seconds, slowdown)
