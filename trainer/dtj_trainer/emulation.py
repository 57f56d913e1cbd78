"""Modelled hardware, for benchmarks and tests: never a setting of a job.

A worker's compute can be made to take longer than it does on this machine (a
slower GPU generation; GPU-like step times on a CPU, where communication is
small next to compute) by sleeping after the real compute, before the worker
communicates: it changes how long a step takes, never what it computes. The
launcher, the simulator and the benchmarks set it through a worker's
environment (DTJ_SIMULATE_SAMPLE_SECONDS, DTJ_SIMULATE_SLOWDOWN, and for a
shared cluster's noise DTJ_SIMULATE_JITTER: each step's modelled compute times
1 + U(-j, j); DTJ_SIMULATE_SLOWDOWN_AFTER="seconds:factor": the slowdown
becomes `factor` that long after the first step); a job's spec cannot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Emulation:
    sample_seconds: float = 0.0  # modelled compute per sample on a speed-1 worker
    slowdown: float = 1.0  # factor >= 1 on all of this worker's compute, real and modelled
    jitter: float = 0.0  # each step's modelled compute x (1 + U(-jitter, jitter))
    later: tuple[float, float] | None = None  # (seconds after the first step, slowdown)
    seed: int = 0
    _rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    _first: list[float] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def factor(self) -> float:
        """This worker's slowdown now (it may change mid-run)."""
        if self.later is None:
            return self.slowdown
        now = time.monotonic()
        if not self._first:
            self._first.append(now)
        return self.later[1] if now - self._first[0] >= self.later[0] else self.slowdown

    def extra_seconds(self, real: float, batch: int) -> float:
        """What to sleep after `real` seconds of compute on a batch of `batch`."""
        slowdown = self.factor()
        noise = 1 + self._rng.uniform(-self.jitter, self.jitter) if self.jitter else 1.0
        return (slowdown - 1) * real + self.sample_seconds * slowdown * batch * noise

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Emulation:
        slowdown = float(env.get("DTJ_SIMULATE_SLOWDOWN", "1"))
        if slowdown < 1:
            raise SystemExit(f"DTJ_SIMULATE_SLOWDOWN={slowdown} must be >= 1")
        sample_seconds = float(env.get("DTJ_SIMULATE_SAMPLE_SECONDS", "0"))
        if sample_seconds < 0:
            raise SystemExit(f"DTJ_SIMULATE_SAMPLE_SECONDS={sample_seconds} must be >= 0")
        jitter = float(env.get("DTJ_SIMULATE_JITTER", "0"))
        if not 0 <= jitter < 1:
            raise SystemExit(f"DTJ_SIMULATE_JITTER={jitter} must be in [0, 1)")
        later = None
        if after := env.get("DTJ_SIMULATE_SLOWDOWN_AFTER"):
            seconds, _, factor = after.partition(":")
            later = (float(seconds), float(factor or "1"))
        seed = int(env.get("DTJ_RANK", "0"))
        return cls(sample_seconds, slowdown, jitter, later, seed)
