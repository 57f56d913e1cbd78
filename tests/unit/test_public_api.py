"""The trainer's public API is a small, stable surface: this test freezes it.

A change here is a change for every user's training script: make it on purpose,
update docs/user-loop.md with it, and then this list.
"""

from __future__ import annotations

import inspect
import re

import dtj_trainer
from dtj_trainer import api

FROZEN = {
    "init": "(env: 'Mapping[str, str] | None' = None) -> 'Job'",
    "Job.wrap": "(self, model: 'nn.Module', optimizer: 'torch.optim.Optimizer', *, "
    "clip_grad_norm: 'float | None' = None) -> 'WrappedOptimizer'",
    "Job.track": "(self, **objects: 'Stateful') -> 'None'",
    "Job.batches": "(self, dataset: 'Any', *, collate: 'Callable[[list[Any]], Any]' = "
    "<function default_collate>, labels: 'Sequence[int] | None' = None, evaluate: "
    "'Callable[[], Mapping[str, float]] | None' = None, num_workers: 'int' = 0, "
    "pin_memory: 'bool' = False) -> 'Iterator[Any]'",
    "Job.report": "(self, **metrics: 'float') -> 'None'",
    "Job.finish": "(self, **metrics: 'float') -> 'Result | None'",
    "Job.step": "property",
    "Job.progress": "property",
    "Job.batch_size": "property",
    "WrappedOptimizer.step": "(self, closure: 'Callable[[], float] | None' = None) -> 'None'",
}


def surface() -> dict[str, str]:
    out = {"init": str(inspect.signature(api.init))}
    for cls in (api.Job, api.WrappedOptimizer):
        for name, member in vars(cls).items():
            if name.startswith("_") or (cls is api.WrappedOptimizer and name != "step"):
                continue
            key = f"{cls.__name__}.{name}"
            out[key] = (
                "property" if isinstance(member, property) else str(inspect.signature(member))
            )
    return {
        k: re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"<function \1>", v) for k, v in out.items()
    }


def test_the_public_names_are_the_frozen_ones():
    assert dtj_trainer.__all__ == ["Job", "WrappedOptimizer", "init"]
    assert dtj_trainer.init is api.init  # loaded on first use, torch with it


def test_the_public_signatures_are_the_frozen_ones():
    assert surface() == FROZEN
