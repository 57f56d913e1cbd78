"""Data sets read from files, never copied whole into memory.

`TokenFile`: a flat file of token ids (numpy memmap), cut into training
sequences, as language models train (nanoGPT's train.bin). `Shards`: a
directory of `.npy` files (memory-mapped) or `.pt` files (loaded one at a time),
whose samples are numbered file after file; its `shard_sizes` let the data
ledger hand out one file per chunk, so a worker reads a file from start to end.
Both are map-style (`len()` and `[i]`), so `job.batches()` leases them by index
and a torch DataLoader can sit in front (`sampler=` the job's indices).
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np
import torch


class TokenFile:
    """Sequences of `block` tokens (and the next token of each as its target) from a
    memory-mapped token file; sample i starts at token i x `stride` (default `block`)."""

    def __init__(
        self, path: str | Path, block: int, *, dtype: str = "uint16", stride: int | None = None
    ) -> None:
        self.path, self.block, self.stride = Path(path), block, stride or block
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r")
        if len(self.tokens) <= block:
            raise ValueError(f"{self.path}: {len(self.tokens)} tokens, fewer than a block")

    def __len__(self) -> int:
        return (len(self.tokens) - self.block - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(i) * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.block + 1].astype(np.int64))
        return window[:-1], window[1:]


class Shards:
    """The samples of a directory of `.npy` or `.pt` shard files, in file-name order.

    A `.npy` file holds an array of samples along its first axis (memory-mapped); a
    `.pt` file a tensor, or a dict of tensors sharing their first axis (the last one
    read is kept: the ledger's chunks are whole files)."""

    def __init__(self, directory: str | Path) -> None:
        self.files = sorted(
            p for p in Path(directory).iterdir() if p.suffix in (".npy", ".pt") and p.is_file()
        )
        if not self.files:
            raise ValueError(f"{directory}: no .npy or .pt shard files")
        self.shard_sizes = [self._count(p) for p in self.files]
        self._ends = np.cumsum(self.shard_sizes).tolist()
        self._open: tuple[int, Any] | None = None

    @staticmethod
    def _count(path: Path) -> int:
        if path.suffix == ".npy":
            return int(np.load(path, mmap_mode="r").shape[0])
        data = torch.load(path, weights_only=True, mmap=True)
        return len(next(iter(data.values())) if isinstance(data, dict) else data)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _shard(self, f: int) -> Any:
        if self._open is None or self._open[0] != f:
            path = self.files[f]
            if path.suffix == ".npy":
                data: Any = np.load(path, mmap_mode="r")
            else:
                data = torch.load(path, weights_only=True, mmap=True)
            self._open = (f, data)
        return self._open[1]

    def __getitem__(self, i: int) -> Any:
        f = bisect.bisect_right(self._ends, int(i))
        local = int(i) - (self._ends[f - 1] if f else 0)
        data = self._shard(f)
        if isinstance(data, dict):
            return {k: v[local] for k, v in data.items()}
        item = data[local]
        return torch.from_numpy(np.array(item)) if isinstance(item, np.ndarray) else item
