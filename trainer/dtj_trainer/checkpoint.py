"""Atomic whole-job checkpoints, loadable with torch.load(weights_only=True).

Write to a temporary file, fsync, rename: a worker killed mid-write leaves
the previous checkpoint intact. Joining workers warm-start from the live
members instead; these files are for whole-job restarts (suspend and resume,
every pod lost at once, a new job continuing an old one's directory) and for
reading results out of a run.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def path_for(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"worker-{rank}.pt"


def save(directory: str | Path, rank: int, state: dict[str, Any]) -> Path:
    """Write one worker's checkpoint (tensors, numbers, nested dicts) atomically."""
    target = path_for(directory, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(directory: str | Path, rank: int) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path_for(directory, rank), weights_only=True)
    return state


def latest(directory: str | Path, rank: int) -> dict[str, Any] | None:
    """What a (re)starting worker in slot `rank` resumes from: its own slot's
    checkpoint, else the most advanced one in the directory (a slot that never
    wrote one, e.g. after a scale-up), else None."""
    if path_for(directory, rank).exists():
        return load(directory, rank)
    others = sorted(Path(directory).glob("worker-*.pt")) if Path(directory).is_dir() else []
    # Memory-mapped: comparing the steps reads no tensor data of the ones not taken.
    states = [torch.load(p, weights_only=True, mmap=True) for p in others]
    return max(states, key=lambda s: int(s["step"]), default=None)


def to_bytes(state: dict[str, Any]) -> torch.Tensor:
    """`state` (tensors, numbers, nested dicts and lists) as a uint8 tensor, to send."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def from_bytes(blob: torch.Tensor) -> dict[str, Any]:
    """The inverse of `to_bytes`; loads tensors and plain data only (weights_only)."""
    state: dict[str, Any] = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    return state
