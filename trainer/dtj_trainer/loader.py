"""A torch DataLoader in front of the job's data: worker processes and pinned memory.

`job.batches(dataset, num_workers=k, pin_memory=True)` loads the next batches
in k processes while the round runs. The DataLoader draws its index batches
from the worker's sampler (the ledger's leases) ahead of their use; the
sampler counts a batch as this round's only when the loop takes it
(`Sampler.used`), so a commit reports exactly what was trained, and a round
that fails, a hand-back or a drop discards what was loaded ahead (`flush`):
those samples come again from the ledger, or go back to it, never lost and
never trained twice.

A batch loaded ahead has the size the plan had when it was drawn: after a
re-plan (dynamic batching) the next few batches still have the old size, and
the round is told the size it computed (`Local.drawn`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from .data import Sampler


class Loaded:
    """Batches of `dataset` loaded ahead by a DataLoader, in the sampler's order."""

    def __init__(
        self,
        dataset: Any,
        sampler: Sampler,
        collate: Callable[[list[Any]], Any],
        *,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        self.sampler = sampler
        self.want = 1  # the plan's batch size now
        self._sizes: deque[int] = deque()  # of the batches drawn and not yet given out
        self._loader = DataLoader(
            dataset,
            batch_sampler=_Draws(self),
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )
        self._it: Iterator[Any] | None = None
        sampler.on_flush = self.flush

    def next(self, want: int) -> tuple[Any, int]:
        """The next batch and its size; `want` is the plan's size for batches drawn now."""
        self.want = want
        if self._it is None:
            self._it = iter(self._loader)
        batch = next(self._it)
        n = self._sizes.popleft()
        self.sampler.used(n)
        return batch, n

    def close(self) -> None:
        """The end of the loop: the DataLoader's processes go."""
        self.flush()
        self._loader = None  # type: ignore[assignment]  # with it, its persistent iterator

    def flush(self) -> None:
        """Drop what was loaded ahead (the sampler takes it back)."""
        self._it = None  # the next iter() resets the loader; its workers discard the rest
        self._sizes.clear()


class _Draws:
    """The DataLoader's batch sampler: index batches drawn from the sampler as it asks."""

    def __init__(self, feed: Loaded) -> None:
        self.feed = feed

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            idx = self.feed.sampler.ahead(self.feed.want)
            self.feed._sizes.append(len(idx))
            yield [int(i) for i in idx]
