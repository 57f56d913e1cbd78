"""Atomic whole-job checkpoints, loadable with torch.load(weights_only=True).

Write to a temporary file, fsync, rename: a worker killed mid-write leaves
the previous checkpoint intact. Joining workers warm-start from a live
neighbour instead; these files are for whole-job restarts and for reading
results out of a run.
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


def save(directory: str | Path, rank: int, *, step: int, params: torch.Tensor) -> Path:
    target = path_for(directory, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"step": step, "params": params.detach().cpu()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(directory: str | Path, rank: int) -> dict[str, object]:
    state: dict[str, object] = torch.load(path_for(directory, rank), weights_only=True)
    return state


def to_bytes(state: dict[str, Any]) -> torch.Tensor:
    """`state` (tensors, numbers, nested dicts and lists) as a uint8 tensor, to send."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def from_bytes(blob: torch.Tensor) -> dict[str, Any]:
    """The inverse of `to_bytes`; loads tensors and plain data only (weights_only)."""
    state: dict[str, Any] = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    return state
