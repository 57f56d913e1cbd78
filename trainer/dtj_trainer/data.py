"""Offline data sets and how they are split across workers.

A data set is a `Dataset` of tensors (train and test). Built-ins need no
download (scikit-learn ships the digits images); anything else comes from an
importable factory `module:function` returning a `Dataset`. Splits are pure
functions of (labels, n, seed) so every worker computes the same partition
without talking to the others.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import ledger
from .config import DataSplitSpec, TrainerConfig
from .registry import load_factory


@dataclass(frozen=True)
class Dataset:
    """Features as float32 [N, ...], labels as int64 [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max().item()) + 1

    @property
    def num_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): 75/25 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int64)
    cut = int(0.75 * len(y))
    return Dataset(
        torch.from_numpy(x[:cut]),
        torch.from_numpy(y[:cut]),
        torch.from_numpy(x[cut:]),
        torch.from_numpy(y[cut:]),
    )


def synthetic(seed: int = 0) -> Dataset:
    """A Gaussian-mixture classification task big enough to shard over 256 workers.

    10 classes in 32 dimensions, 40,000 training and 4,000 test samples; the
    class means overlap so accuracy climbs over hundreds of steps (like the
    paper's synthetic CPU task).
    """
    rng = np.random.default_rng(seed + 1)
    classes, dim = 10, 32
    means = rng.normal(0.0, 1.0, size=(classes, dim)).astype(np.float32)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, classes, size=count)
        x = means[y] + rng.normal(0.0, 1.5, size=(count, dim)).astype(np.float32)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    x_train, y_train = draw(40_000)
    x_test, y_test = draw(4_000)
    return Dataset(x_train, y_train, x_test, y_test)


def clusters(seed: int = 0) -> Dataset:
    """A harder task than digits: scikit-learn's make_classification (Guyon's Madelon
    design), 10 classes of 3 Gaussian clusters each in 40 dimensions (20 informative),
    40,000 training and 4,000 test samples, standardised. Not linearly separable:
    logistic regression stays near 51% test accuracy, a 64-unit MLP reaches ~78%
    (3,000 steps of 128 on one worker)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=44_000,
        n_features=40,
        n_informative=20,
        n_redundant=10,
        n_classes=10,
        n_clusters_per_class=3,
        class_sep=1.5,
        flip_y=0.01,
        random_state=seed + 1,
    )
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = y.astype(np.int64)
    return Dataset(
        torch.from_numpy(x[:40_000]),
        torch.from_numpy(y[:40_000]),
        torch.from_numpy(x[40_000:]),
        torch.from_numpy(y[40_000:]),
    )


BUILTIN = {"digits": digits, "synthetic": synthetic, "clusters": clusters}


@functools.lru_cache(maxsize=4)
def load(name: str, seed: int) -> Dataset:
    """A built-in data set by name, or a user factory `module:function(seed=...)`."""
    if name in BUILTIN:
        return BUILTIN[name](seed)
    factory = load_factory(name, what="dataset", builtin=sorted(BUILTIN))
    data = factory(seed=seed)
    if not isinstance(data, Dataset):
        raise TypeError(f"dataset factory {name!r} must return dtj_trainer.data.Dataset")
    return data


def split(labels: np.ndarray, n: int, spec: DataSplitSpec, seed: int) -> list[np.ndarray]:
    """Indices of each worker's shard: IID, or label-skewed Dirichlet(alpha) (Hsu et al. 2019)."""
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), n)]
    shards: list[list[int]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([spec.alpha] * n)) * len(idx)).astype(int)[:-1]
        for w, part in enumerate(np.split(idx, cuts)):
            shards[w].extend(part.tolist())
    # A worker with no sample cannot step: lend it one from the largest shard.
    for w in range(n):
        if not shards[w]:
            donor = max(range(n), key=lambda j: len(shards[j]))
            shards[w].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def shard(
    size: int, labels: np.ndarray | None, parts: int, slot: int, spec: DataSplitSpec, seed: int
) -> torch.Tensor:
    """The indices of shard `slot` of `parts` (`split`); labels are needed for dirichlet.
    A slot left with no sample (more slots than samples) trains on the whole set."""
    if labels is None:
        if spec.kind != "iid":
            raise ValueError(
                f"training.dataSplit {spec.kind} cuts shards by label: pass the labels "
                "(job.batches(dataset, labels=...)) or use dataSplit iid"
            )
        labels = np.zeros(size, dtype=np.int64)
    mine = split(labels, parts, spec, seed)[slot]
    return torch.from_numpy(mine) if len(mine) else torch.arange(size)


class Sampler:
    """Endless shuffled mini-batches from one worker's fixed shard (dataSplit iid,
    dirichlet). The hooks after `next` are the ledger's (LedgerSampler); a fixed
    shard needs none of them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> None:
        self.x, self.y = x, y
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(y), generator=self._gen)
        self._pos = 0

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        take: list[torch.Tensor] = []
        need = batch
        while need > 0:
            if self._pos >= len(self._order):
                self._order = torch.randperm(len(self.y), generator=self._gen)
                self._pos = 0
            chunk = self._order[self._pos : self._pos + need]
            self._pos += len(chunk)
            need -= len(chunk)
            take.append(chunk)
        idx = torch.cat(take)
        return self.x[idx], self.y[idx]

    def ahead(self, batch: int) -> Any:
        """The next batch's `x` (indices, in a user's loop), to be loaded ahead of its
        use (`used`): the loader's side of `next`."""
        return self.next(batch)[0]

    def used(self, n: int) -> None:
        """`n` samples given out by `ahead` went into this round."""

    on_flush: Callable[[], None] | None = None  # drops what a loader loaded ahead

    epoch: int | None = None  # the ledger's epoch of the last batch (fixed shards: none)

    def commit(self) -> None:
        """The round that trained the last batches is over."""

    def rollback(self) -> None:
        """The round failed: its batches were not trained."""

    def hand_back(self) -> None:
        """This worker leaves."""

    def forget(self) -> None:
        """The job dropped this worker (it stopped answering)."""

    def reseed(self, *, now: bool = False) -> None:
        """The job has a new coordinator."""

    def announce(self, store: Any) -> None:
        """Tell a new coordinator at once what this worker holds (another thread)."""

    def state_dict(self) -> dict[str, Any]:
        """Where this worker is in its data (checkpointed: a resume continues the order)."""
        return {"rng": self._gen.get_state(), "order": self._order.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "order" not in state or len(state["order"]) != len(self.y):
            return  # another shard (a different replicas count): start its order afresh
        self._gen.set_state(state["rng"])
        self._order, self._pos = state["order"].clone(), int(state["pos"])


class LedgerSampler(Sampler):
    """Mini-batches of the samples the job's data ledger leases to this worker
    (ledger.Reader): `x` and `y` are the whole training set, indexed, never copied."""

    def __init__(self, x: Any, y: Any, reader: ledger.Reader) -> None:
        self.x, self.y, self.reader = x, y, reader
        self._used = 0  # samples of this round (the rest of the taken are loaded ahead)

    @property
    def epoch(self) -> int | None:  # type: ignore[override]
        return self.reader.epoch

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.reader.take(batch))
        self._used += len(idx)
        return self.x[idx], self.y[idx]

    def ahead(self, batch: int) -> Any:
        return self.x[torch.from_numpy(self.reader.take(batch))]

    def used(self, n: int) -> None:
        self._used += n

    def commit(self) -> None:
        self.reader.commit(self._used)
        self._used = 0

    def rollback(self) -> None:
        self._flush()
        self.reader.rollback()
        self._used = 0

    def hand_back(self) -> None:
        self._flush()
        self.reader.hand_back()

    def forget(self) -> None:
        self._flush()  # what was loaded ahead may be another worker's now
        self.reader.unread(self.reader.pending - self._used)
        self.reader.forget()

    def _flush(self) -> None:
        if self.on_flush is not None:
            self.on_flush()

    def reseed(self, *, now: bool = False) -> None:
        self.reader.reseed(now=now)

    def announce(self, store: Any) -> None:
        self.reader.announce(store)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.reader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ledger" in state:
            self.reader.load_state_dict(state["ledger"])


def sampler_for(
    cfg: TrainerConfig,
    x: Any,
    y: Any,
    labels: np.ndarray | None,
    *,
    slot: int,
    parts: int,
    reader: Callable[[ledger.Plan], ledger.Reader],
    shard_sizes: list[int] | None = None,
) -> Sampler:
    """This worker's batches of the training set (`x[i]`, `y[i]`): leased from the job's
    data ledger (one chunk per shard file when the data set has `shard_sizes`, unless
    chunkSamples is set), or its fixed shard `slot` of `parts` (dataSplit iid,
    dirichlet)."""
    spec, seed, size = cfg.training.data_split, cfg.training.seed, len(x)
    if spec.kind == "ledger":
        if shard_sizes and spec.chunk_samples is None:
            return LedgerSampler(x, y, reader(ledger.Plan.of_sizes(shard_sizes, seed)))
        chunk = spec.chunk_samples or ledger.auto_chunk(size, cfg.replicas, cfg.batching.per_worker)
        return LedgerSampler(x, y, reader(ledger.Plan.even(size, min(chunk, size), seed)))
    mine = shard(size, labels, parts, slot, spec, seed)
    return Sampler(x[mine], y[mine], seed=seed * 100_003 + slot)


class Indices:
    """The indices 0..size-1 as a lazy "data set": `Indices(n)[idx]` is `idx`. A user's
    loop samples indices and reads its own data set with them (no copy of it here)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return idx
